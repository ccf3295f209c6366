"""`hypernet`: rows of new tokens predicted by a trained ZeTT-style hypernetwork (`--set hypernet=PATH`).

Registered through the `tokentransplant.initializers` entry point (pyproject.toml), so `transplant/` never
imports `hypernet/`.

Shared tokens are copied by the sparse part of the plan; the hypernetwork's predictions arrive through the plan's
dense-row hook. `--set predict_shared=true` predicts the shared tokens too (ZeTT's original setting). Tokens with
no bytes (new specials) get the mean base row.
"""

from __future__ import annotations

import torch

from transplant.errors import TransplantError
from transplant.init.base import InitContext, InitPlan, copy_shared, normal_base_ids, sparse_rows
from transplant.init.registry import Option, register

OPTIONS = (
    Option("hypernet", str, None, "dir of a trained hypernetwork (`hypernet train`)"),
    Option("predict_shared", bool, False, "predict shared tokens too instead of copying them (ZeTT's setting)"),
)


@register("hypernet", options=OPTIONS)
def hypernet_init(ctx: InitContext) -> InitPlan:
    from hypernet.apply import load_for_base, predict_rows

    path = ctx.options["hypernet"]
    if not path:
        raise TransplantError("method 'hypernet' needs a trained hypernetwork: pass --set hypernet=PATH "
                              "(train one with `hypernet train recipes/hypernet_smollm2_cpu.yaml`)")
    net = load_for_base(path, ctx.base_input, ctx.base_output)
    predict_shared = ctx.options["predict_shared"]
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    if predict_shared:
        target = torch.tensor([i for i, b in enumerate(ctx.new_vocab.token_bytes) if b], dtype=torch.long)
        target = torch.unique(torch.cat([target, ctx.alignment.unshared_new_ids]))
    else:
        target = ctx.alignment.unshared_new_ids
    where, rows_in, rows_out = predict_rows(net, ctx.base_vocab, [ctx.new_vocab.token_bytes[i] for i in target.tolist()],
                                            ctx.base_input, ctx.base_output)
    predicted = target[where]
    unfilled = target[~torch.isin(target, predicted)]
    population = normal_base_ids(ctx.base_vocab)

    def dense(role: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = rows_out if role == "output" else rows_in
        mean = base[population.to(base.device)].float().mean(0)
        ids = torch.cat([predicted, unfilled])
        return ids, torch.cat([chosen.to(base.device), mean.expand(int(unfilled.numel()), -1)])

    return InitPlan(weights, dense_rows=dense,
                    notes={"hypernet": str(path), "predicted": int(predicted.numel()), "mean_filled": int(unfilled.numel()),
                           "predict_shared": predict_shared})
