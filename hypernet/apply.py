"""Predict embedding rows for a new vocabulary with a trained hypernetwork (no donor model needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from hypernet.model import Hypernet, decompose, load_hypernet
from transplant.errors import TransplantError
from transplant.tokenizers.vocab import Vocab


def check_fits(net: Hypernet, base_input: torch.Tensor, base_output: torch.Tensor | None, where: str) -> None:
    """A hypernetwork reads the base's own rows, so it only fits the base (dimension, vocab, tie) it was trained on."""
    cfg = net.config
    if base_input.shape[1] != cfg.base_dim or base_input.shape[0] < cfg.base_vocab_size:
        raise TransplantError(
            f"hypernetwork {where} was trained for a base with {cfg.base_vocab_size}x{cfg.base_dim} embeddings "
            f"({cfg.base_name or 'unknown base'}), this base has {tuple(base_input.shape)}; "
            "train a hypernetwork for this base with `hypernet train RECIPE.yaml`"
        )
    if cfg.untied and base_output is None:
        raise TransplantError(f"hypernetwork {where} expects an untied base (separate lm_head) but this base is tied; "
                              "train one for this base")


@torch.no_grad()
def predict_rows(net: Hypernet, base: Vocab, token_bytes: list[bytes], base_input: torch.Tensor,
                 base_output: torch.Tensor | None, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions with pieces, input rows, output rows) for the given byte strings; empty ones are left out."""
    ids, mask = decompose(base, token_bytes, net.config.max_pieces)
    has = mask.any(1)
    where = torch.nonzero(has).flatten()
    device = base_input.device
    net = net.to(device).eval()
    rows_in, rows_out = [], []
    for start in range(0, where.numel(), batch_size):
        sel = where[start : start + batch_size]
        r_in, r_out = net(ids[sel].to(device), mask[sel].to(device), base_input, base_output)
        rows_in.append(r_in.float())
        rows_out.append(r_out.float())
    dim = base_input.shape[1]
    empty = torch.zeros(0, dim)
    return (where, torch.cat(rows_in) if rows_in else empty, torch.cat(rows_out) if rows_out else empty)


def load_for_base(path: str | Path, base_input: torch.Tensor, base_output: torch.Tensor | None) -> Hypernet:
    net = load_hypernet(path)
    check_fits(net, base_input, base_output, str(path))
    return net
