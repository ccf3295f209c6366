"""`hypernet`: rows of new tokens predicted by a trained ZeTT-style hypernetwork (`--set hypernet=PATH`).

The one way to apply a hypernetwork is `transplant --base B --donor TOKENIZER --method hypernet --set
hypernet=DIR` (`hypernet train` only trains). Registered through the `tokentransplant.initializers` entry
point (pyproject.toml), so `transplant/` never imports `hypernet/`.

Shared tokens are copied by the sparse part of the plan; the hypernetwork's predictions arrive through the
plan's dense-row hook. `--set predict_shared=true` predicts the shared tokens too (ZeTT's original setting).
Tokens with no bytes (new specials) get the mean base row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hypernet.model import Hypernet, decompose, load_hypernet
from transplant.errors import TransplantError
from transplant.init.base import InitContext, InitPlan, copy_shared, normal_base_ids, sparse_rows
from transplant.init.registry import Option, register
from transplant.tokenizers.vocab import Vocab

OPTIONS = (
    Option("hypernet", str, None, "dir of a trained hypernetwork (`hypernet train`)"),
    Option("predict_shared", bool, False,
           "predict shared tokens too instead of copying them (ZeTT's setting)"),
)


def check_fits(net: Hypernet, base_input: torch.Tensor, base_output: torch.Tensor | None, where: str) -> None:
    """A hypernetwork reads the base's own rows, so it only fits the base (dimension, vocab, tie) it was
    trained on."""
    cfg = net.config
    if base_input.shape[1] != cfg.base_dim or base_input.shape[0] < cfg.base_vocab_size:
        raise TransplantError(
            f"hypernetwork {where} was trained for a base with {cfg.base_vocab_size}x{cfg.base_dim} "
            "embeddings "
            f"({cfg.base_name or 'unknown base'}), this base has {tuple(base_input.shape)}; "
            "train a hypernetwork for this base with `hypernet train RECIPE.yaml`"
        )
    if cfg.untied and base_output is None:
        raise TransplantError(f"hypernetwork {where} expects an untied base (separate lm_head) but "
                              "this base is tied; train one for this base")


def load_for_base(path: str | Path, base_input: torch.Tensor, base_output: torch.Tensor | None) -> Hypernet:
    net = load_hypernet(path)
    check_fits(net, base_input, base_output, str(path))
    return net


@torch.no_grad()
def predict_rows(net: Hypernet, base: Vocab, token_bytes: list[bytes], base_input: torch.Tensor,
                 base_output: torch.Tensor | None,
                 batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions with pieces, input rows, output rows) for the given byte strings; empty ones are left
    out."""
    ids, mask = decompose(base, token_bytes, net.config.max_pieces)
    where = torch.nonzero(mask.any(1)).flatten()
    device = base_input.device
    net = net.to(device).eval()
    rows_in, rows_out = [], []
    for start in range(0, where.numel(), batch_size):
        sel = where[start : start + batch_size]
        r_in, r_out = net(ids[sel].to(device), mask[sel].to(device), base_input, base_output)
        rows_in.append(r_in.float())
        rows_out.append(r_out.float())
    empty = torch.zeros(0, base_input.shape[1])
    return (where, torch.cat(rows_in) if rows_in else empty, torch.cat(rows_out) if rows_out else empty)


@register("hypernet", options=OPTIONS)
def hypernet_init(ctx: InitContext) -> InitPlan:
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
    where, rows_in, rows_out = predict_rows(net, ctx.base_vocab,
                                            [ctx.new_vocab.token_bytes[i] for i in target.tolist()],
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
                    notes={"hypernet": str(path), "predicted": int(predicted.numel()),
                           "mean_filled": int(unfilled.numel()), "predict_shared": predict_shared})
