"""`mean`: new rows are the mean of the base's text-token rows (specials excluded, they skew the mean)."""

from __future__ import annotations

from transplant.init.base import InitContext, InitPlan, copy_shared, mean_rows, normal_base_ids, sparse_rows
from transplant.init.registry import register


# number_rows: the numbers step is on by default, a mean row knows no digits (bench/RESULTS.md, numbers rows)
@register("mean", number_rows=True)
def mean_init(ctx: InitContext) -> InitPlan:
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    return InitPlan(weights,
                    dense_rows=mean_rows(ctx.alignment.unshared_new_ids, normal_base_ids(ctx.base_vocab)))
