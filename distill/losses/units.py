"""How ALM turns aligned chunks into the units it compares: merging and debiasing.

A chunk's likelihood under a subword model includes every way its last word might go on: "Hell" is likely
as the start of "Hello" on a side that can split there, and the two tokenizers spread that mass differently,
so raw chunk likelihoods are biased comparisons. The reference implementation (tokenkit, `alm_mode =
"merge_by_space_prob+append_space"`, `tokenizer_pair_bias_threshold = 0.1`, `space_mask_mode =
"space+tab+newline+special"`) removes the bias in two steps, which are the default here (`debias: merge`):

1. merge consecutive chunks into a unit until the teacher's probability that the next token starts a new
   unit (first byte space, tab or newline, or a special: `distill.chunks.boundary_mask`) exceeds the
   threshold at the chunk's end;
2. append log P(boundary) at every unit end, on both sides: each unit's likelihood becomes the likelihood of
   "these bytes, then the unit is over", which no segmentation can split differently.

Other modes: `append` (step 2 on every chunk, no merging); `whitespace` (this project's first version: append
P(next token starts with whitespace) only where whitespace follows in the text; chunks followed by anything
else are compared raw); `none`. A unit never spans a gap (markup between two chat turns, a document boundary):
it closes where the next chunk does not start right after it on both sides.

Tensors: B = batch, C = chunks; a unit id lives in [0, C) (ids may skip values), -1 = no unit.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.chunks import ChunkAlignment
from distill.losses.common import fp32, pad_vocab, rows_at
from transplant.errors import TransplantError

DEBIAS_MODES = ("merge", "append", "whitespace", "none")


def debias_mode(value: object) -> str:
    """The debias mode a recipe asks for; booleans of older recipes read as merge (true) and none (false)."""
    if value is True:
        return "merge"
    if value is False or value is None:
        return "none"
    if value in DEBIAS_MODES:
        return str(value)
    raise TransplantError(f"loss.options.alm.debias={value!r} is unknown; use one of "
                          f"{', '.join(DEBIAS_MODES)}")


def next_logprob(logits: torch.Tensor, positions: torch.Tensor, needed: torch.Tensor,
                 event: torch.Tensor) -> torch.Tensor:
    """[B, C]: log P(next token in `event`) read from the logits at `positions`; 0 where not `needed`.

    Equals log(softmax(logits[b, positions[b, c]]) @ event) for every needed (b, c), computed as the
    logsumexp of the event's columns minus the row's, so no probability vector is materialised (and it is
    exact for tiny probabilities). `event`: bool [V] (padded to the logits' vocab)."""
    rows = fp32(rows_at(logits, positions, needed))
    columns = torch.nonzero(pad_vocab(event.to(rows.device, torch.bool), rows.shape[-1], False))[:, 0]
    logp = torch.logsumexp(rows.index_select(-1, columns), -1) - torch.logsumexp(rows, -1)
    out = torch.zeros(needed.shape, dtype=logp.dtype, device=logp.device)
    return out.index_put(torch.nonzero(needed, as_tuple=True), logp.clamp(max=0.0))


def adjacent_to_next(alignment: ChunkAlignment) -> torch.Tensor:
    """Bool [B, C]: chunk c + 1 starts at the token right after chunk c on both sides (c + 1 < C)."""
    joined = torch.ones_like(alignment.chunk_mask)
    for prefix in ("teacher", "student"):
        first, last = getattr(alignment, f"{prefix}_chunk_first"), getattr(alignment, f"{prefix}_chunk_last")
        joined[:, :-1] &= first[:, 1:] == last[:, :-1] + 1
    joined[:, -1] = False
    return joined & alignment.chunk_mask & torch.nn.functional.pad(alignment.chunk_mask[:, 1:], (0, 1))


def boundary_units(valid: torch.Tensor, teacher_boundary_logp: torch.Tensor, adjacent: torch.Tensor,
                   threshold: float) -> torch.Tensor:
    """Long [B, C]: unit id of each valid chunk (-1 otherwise). A unit closes after a chunk where the
    teacher's P(boundary) > `threshold`, before a chunk that is not adjacent, and at invalid chunks; ids are
    the number of closes before the chunk, so they increase along the row (and may skip values)."""
    close = ~valid | ~adjacent | (teacher_boundary_logp > np.log(threshold))
    before = torch.cumsum(close.long(), dim=1) - close.long()
    return torch.where(valid, before, -1)


def likelihood_units(teacher_logl: torch.Tensor, valid: torch.Tensor, log_threshold: float) -> torch.Tensor:
    """Long [B, C]: legacy merging by likelihood (`merge_threshold`): consecutive valid chunks join until the
    teacher's merged likelihood drops to or below the threshold; the last group of a row may stay above it and
    an invalid chunk ends a group. Ids are 0.. per row in order, -1 for invalid chunks."""
    logl = teacher_logl.detach().float().cpu().numpy()
    ok = valid.cpu().numpy()
    batch, n = ok.shape
    group = np.full((batch, n), -1, dtype=np.int64)
    acc, is_open, current = np.zeros(batch), np.zeros(batch, bool), np.full(batch, -1, dtype=np.int64)
    for col in range(n):
        here = ok[:, col]
        current += here & ~is_open
        group[:, col] = np.where(here, current, -1)
        acc = np.where(is_open, acc, 0.0) + np.where(here, logl[:, col], 0.0)
        is_open = here & (acc > log_threshold)
    return torch.from_numpy(group).to(teacher_logl.device)


def unit_last_chunk(units: torch.Tensor) -> torch.Tensor:
    """Long [B, C]: for unit u (a column), the index of its last chunk (0 for empty units)."""
    n = units.shape[1]
    slot = torch.where(units < 0, n, units)
    index = torch.arange(n, device=units.device).expand_as(units)
    out = torch.zeros(units.shape[0], n + 1, dtype=torch.long, device=units.device)
    return out.scatter_reduce(1, slot, index, "amax")[:, :n]
