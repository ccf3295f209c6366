"""`fvt` (Fast Vocabulary Transfer): a new token's row is the mean of the base rows of its base segmentation.

Tokens with no bytes (new specials without a base counterpart) get the mean base row.
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan, copy_shared, mean_rows, normal_base_ids, sparse_rows
from transplant.init.registry import register
from transplant.tokenizers.segment import segment_with_base


@register("fvt")
def fvt_init(ctx: InitContext) -> InitPlan:
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    new_ids = ctx.alignment.unshared_new_ids.tolist()
    pieces = segment_with_base(ctx.base_vocab, [ctx.new_vocab.token_bytes[i] for i in new_ids])
    unfilled: list[int] = []
    examples: dict[int, list[int]] = {}
    for new_id, base_ids in zip(new_ids, pieces):
        if not base_ids:
            unfilled.append(new_id)
            continue
        weight = 1.0 / len(base_ids)
        rows.extend([new_id] * len(base_ids))
        cols.extend(base_ids)
        vals.extend([weight] * len(base_ids))
        if len(examples) < 2000:
            examples[new_id] = base_ids
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    fallback = torch.tensor(unfilled, dtype=torch.long)
    dense = mean_rows(fallback, normal_base_ids(ctx.base_vocab)) if unfilled else None
    return InitPlan(weights, dense_rows=dense, notes={"mean_filled": len(unfilled)})
