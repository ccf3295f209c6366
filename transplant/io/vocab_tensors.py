"""Every tensor with one entry per token, not only the embeddings: found, checked, rebuilt for a new vocab.

Masked LMs carry a bias per token next to their decoder (`lm_head.bias`, `lm_head.decoder.bias`,
`cls.predictions.bias`), BART-style models a `final_logits_bias` of shape [1, V]. An output that keeps their
old length does not load (`AutoModelForMaskedLM` refuses the size mismatch), so the surgery rebuilds each of
them.

How a new entry is made: the way its embedding row was. An initializer's plan writes every new row as a
weighted sum of base rows (`W`, `transplant.init.base.InitPlan`); composing the bias with the same weights
keeps the logit of a new token the same weighted sum of base logits it is for the row alone (h·Σ W_j e_j + Σ
W_j b_j = Σ W_j (h·e_j + b_j)). Shared tokens are one-hot rows of W, so their bias is copied exactly. Rows W
leaves empty (tokens built as dense rows: random, learned, fallbacks) get the mean bias, as do padded rows
(the same argument as `surgery.pad_embeddings`: a mean entry scores the average, never the best).

A 2-D tensor with V rows that is not an embedding and whose name is about tokens (`embed`, `vocab`, `head`,
...) is refused rather than copied with a wrong length: an unknown architecture is a one-line error, not a
broken output. Per-layer tensors, position tables and tensors named for something else (a vision tower's patch
table) are never per token, whatever their size.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from transplant.errors import TransplantError
from transplant.io import safetensors

log = logging.getLogger(__name__)

# [V_base, k] float32 -> [V_new, k] float32
RowComposer = Callable[[torch.Tensor], torch.Tensor]

TRAILING_VOCAB_NAMES = ("final_logits_bias",)  # [1, V]: the vocabulary runs along the last axis
_PER_LAYER = re.compile(r"\.\d+\.")  # a per-layer tensor is never per token, even when its size equals V
_NEVER_PER_TOKEN = ("position", "token_type", "rel_attn", "relative",  # position tables
                    "vision", "visual", "audio", "patch", "projector")  # other modalities' towers
# A 2-D tensor with V rows is refused only if its name says it is about tokens; a vision tower's patch table
# whose size happens to equal V is copied (with a note), as it is on every other model.
_TOKEN_WORDS = ("embed", "token", "vocab", "lm_head", "logit", "output", "decoder", "head", "wte", "unembed")


@dataclass(frozen=True)
class VocabTensor:
    """A tensor other than the embeddings whose `axis` runs over the vocabulary."""

    name: str
    axis: int


def _vocab_axis(name: str, entry: safetensors.TensorEntry, rows: int) -> int | None:
    shape = entry.shape
    if not shape or _PER_LAYER.search(name):
        return None
    if name.endswith(TRAILING_VOCAB_NAMES) and shape[-1] == rows and math.prod(shape[:-1]) == 1:
        return len(shape) - 1
    if shape[0] != rows:
        return None
    lowered = name.lower()
    if any(word in lowered for word in _NEVER_PER_TOKEN):
        return None  # a position table or vision tensor that happens to have as many rows as the vocabulary
    if len(shape) == 1:
        return 0
    if not any(word in lowered for word in _TOKEN_WORDS):
        log.info("%s %s has as many rows as the vocabulary but its name is not about tokens; copied "
                 "unchanged", name, list(shape))
        return None
    raise TransplantError(
        f"{name} {list(shape)} has one row per token of the base vocabulary but is not an embedding "
        "tokentransplant knows how to rebuild; this architecture is not supported yet, please report it with "
        "the model's config.json"
    )


def find_vocab_tensors(entries: dict[str, safetensors.TensorEntry], rows: int,
                       embeddings: Iterable[str | None]) -> list[VocabTensor]:
    """The tensors besides `embeddings` that hold one entry per token of a `rows`-token vocabulary."""
    skip = {name for name in embeddings if name}
    found = []
    for name, entry in entries.items():
        if name in skip:
            continue
        axis = _vocab_axis(name, entry, rows)
        if axis is None:
            continue
        if entry.dtype is None or not entry.dtype.is_floating_point:
            raise TransplantError(f"{name} holds one {entry.code} value per token; only floating per-token "
                                  "tensors can be rebuilt for a new vocabulary, please report this model")
        found.append(VocabTensor(name, axis))
    return found


def sparse_composer(weights: torch.Tensor) -> RowComposer:
    """Compose per-token values as the plan's sparse `weights` [V_new, V_base] compose embedding rows (module
    docstring); rows the weights leave empty get the mean of the base values."""
    weights = weights.coalesce().float().cpu()
    covered = torch.zeros(weights.shape[0], dtype=torch.bool)
    covered[weights.indices()[0]] = True

    def compose(base: torch.Tensor) -> torch.Tensor:
        base = base.float()
        if base.shape[0] < weights.shape[1]:
            raise ValueError(f"per-token tensor has {base.shape[0]} rows, the plan reads {weights.shape[1]}")
        out = torch.sparse.mm(weights, base[: weights.shape[1]].contiguous())
        out[~covered] = base.mean(dim=0)
        return out

    return compose


def rebuild(tensor: torch.Tensor, axis: int, compose: RowComposer, rows: int,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` with its vocabulary `axis` rebuilt by `compose` and padded with the mean up to `rows`
    entries."""
    moved = tensor.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    new = compose(flat)
    if new.shape[0] > rows:
        raise ValueError(f"composed {new.shape[0]} entries for a {rows}-token vocabulary")
    if new.shape[0] < rows:
        fill = flat.float().mean(dim=0, keepdim=True).expand(rows - new.shape[0], -1)
        new = torch.cat([new, fill], dim=0)
    new = new.reshape(rows, *moved.shape[1:]).movedim(0, axis)
    result = new.to(dtype or tensor.dtype).contiguous()
    if not torch.isfinite(result.float()).all():
        raise ValueError("rebuilt per-token tensor contains NaN or inf")
    return result


def new_shape(shape: tuple[int, ...], axis: int, rows: int) -> tuple[int, ...]:
    return tuple(rows if i == axis else size for i, size in enumerate(shape))
