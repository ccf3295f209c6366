"""`mean`: new rows are the mean of the base's text-token rows (specials excluded, they skew the mean)."""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan, copy_shared, normal_base_ids, sparse_rows
from transplant.init.registry import register


def mean_rows(new_ids: torch.Tensor, population: torch.Tensor):
    """Dense-row hook filling `new_ids` with the mean of the base rows in `population`."""

    def rows(role: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = base[population.to(base.device)].float().mean(0)
        return new_ids, mean.expand(int(new_ids.numel()), -1)

    return rows


@register("mean")
def mean_init(ctx: InitContext) -> InitPlan:
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    return InitPlan(weights, dense_rows=mean_rows(ctx.alignment.new_ids, normal_base_ids(ctx.base_vocab)))
