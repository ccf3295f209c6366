"""`zero`: copy shared tokens, leave new rows at zero. The floor every other method must beat."""

from __future__ import annotations

from transplant.init.base import InitContext, InitPlan, copy_shared, sparse_rows
from transplant.init.registry import register


@register("zero")
def zero_init(ctx: InitContext) -> InitPlan:
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    return InitPlan(sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab))))
