"""Approximate Likelihood Matching (ALM; Minixhofer et al., "Cross-Tokenizer Distillation via Approximate
Likelihood Matching").

Two tokenizers rarely predict the same next token, but over an aligned chunk (same bytes on both sides) both
models assign a likelihood to the same event: "the text continues with these bytes". ALM makes the student's
chunk likelihoods match the teacher's, which is pure distillation with no next-token target.

Per chunk and side, log L = sum of the log-probs of the chunk's tokens (a scatter-add over the token -> chunk
index, i.e. the matmul with the one-hot token x chunk matrix). With a = log L_t / tau and b = log L_s / tau, the
default difference is the binarised cross-entropy between Bernoulli(p_t = e^a) and Bernoulli(p_s = e^b):
    -(p_t * b + (1 - p_t) * log(1 - e^b)),
computed in log space (log1mexp). It is minimal (= the teacher's binary entropy) exactly when the likelihoods
match; "binary_kl" subtracts that entropy so the minimum is 0; "l1" (registered as `alm-l1`) is |a - b|.
tau (default 100, the value public ALM configs use) spreads the informative range over low-likelihood chunks:
at tau = 1 a chunk with likelihood e^-10 would contribute almost nothing.

Options:
- `debias`: a chunk's likelihood under a subword model includes every way its last word might continue ("Hell"
  + "o" vs "Hello"); the two tokenizers spread that mass differently. For chunks that the text follows with
  whitespace, both sides' likelihoods are multiplied by P(next token starts with a whitespace byte) at the chunk's
  last position (masks from `distill.chunks.word_start_mask`), turning each into the likelihood of the chunk *as
  a finished word*. Chunks followed by anything else are left as they are (the event did not happen).
- `merge_threshold`: greedily merge consecutive valid chunks until the teacher's merged likelihood drops to or
  below the threshold (chunks of near-certain bytes carry little signal alone); the last group of a row may stay
  above it. Merging stops at invalid chunks. Computed on CPU from the detached teacher likelihoods (one numpy
  step per chunk column, vectorised over the batch); debiasing then applies at each group's end.
- `hidden_weight` > 0 adds MSE between the student's (projected, `hidden_projection`) and the teacher's last
  hidden states at chunk ends, where both have read exactly the same bytes.
Items (normaliser) are valid chunks before merging: complete on both sides, with no token at position 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from distill.chunks import ChunkAlignment, word_start_mask
from distill.losses.common import (
    alm_valid_chunks,
    chunk_sums,
    fp32,
    log1mexp,
    normalise,
    pad_vocab,
    rows_at,
    side,
    token_logprobs,
)
from distill.losses.registry import PairContext, keyword_options, register
from transplant.errors import TransplantError

DIFFERENCES = ("binary_ce", "binary_kl", "l1")


def chunk_difference(teacher_logl: torch.Tensor, student_logl: torch.Tensor, diff: str = "binary_ce",
                     temperature: float = 100.0, eps: float = 1e-6) -> torch.Tensor:
    """Elementwise ALM difference between chunk log-likelihoods (see module docstring)."""
    a = (teacher_logl / temperature).clamp(max=0.0)
    b = student_logl / temperature
    if diff == "l1":
        return (a - b).abs()
    if diff not in DIFFERENCES:
        raise TransplantError(f"unknown ALM difference {diff!r}; choose one of: {', '.join(DIFFERENCES)}")
    # A chunk of probability ~1 has log(1 - p) = -inf; clamping keeps the loss finite (its gradient is then 0).
    b = b.clamp(max=-eps)
    p_t = torch.exp(a)
    cross = -(p_t * b + (1.0 - p_t) * log1mexp(b))
    if diff == "binary_ce":
        return cross
    a = a.clamp(max=-eps)
    return cross + (p_t * a + (1.0 - p_t) * log1mexp(a))


def merge_chunks(teacher_logl: torch.Tensor, valid: torch.Tensor, log_threshold: float) -> torch.Tensor:
    """Long [B, C]: merged-group id of each chunk (-1 for invalid ones); ids are 0.. per row in order."""
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


def _word_start_logprob(logits: torch.Tensor, positions: torch.Tensor, needed: torch.Tensor,
                        word_start: torch.Tensor) -> torch.Tensor:
    """[B, U]: log P(next token in word_start) from the logits at `positions`, 0 where not `needed`."""
    rows = fp32(rows_at(logits, positions, needed))
    mask = pad_vocab(word_start.to(rows.device, torch.bool), rows.shape[-1], False)
    logp = torch.logsumexp(rows.masked_fill(~mask, float("-inf")), -1) - torch.logsumexp(rows, -1)
    out = torch.zeros(needed.shape, dtype=logp.dtype, device=logp.device)
    return out.index_put(torch.nonzero(needed, as_tuple=True), logp)


def _hidden_mse(batch: Mapping[str, Any], alignment: ChunkAlignment, valid: torch.Tensor,
                projection: Callable | None) -> torch.Tensor:
    student = rows_at(batch["student_hidden_states"], alignment.student_chunk_last, valid)
    teacher = rows_at(batch["teacher_hidden_states"].detach(), alignment.teacher_chunk_last, valid)
    if projection is not None:
        student = projection(student)
    if student.shape[-1] != teacher.shape[-1]:
        raise TransplantError(f"hidden sizes differ (student {student.shape[-1]}, teacher {teacher.shape[-1]}); "
                              "pass hidden_projection=torch.nn.Linear(student_dim, teacher_dim)")
    return ((fp32(student) - fp32(teacher)) ** 2).mean(-1).sum()


def count_alm_items(batch: Mapping[str, Any]) -> int:
    return int(alm_valid_chunks(batch["alignment"]).sum())


def prepare_alm(ctx: PairContext) -> dict[str, torch.Tensor]:
    """Both vocabularies' word-start masks when `debias` is on (vocab-sized: built once, not per batch)."""
    if not ctx.options.get("debias"):
        return {}
    return {"teacher_word_start_mask": word_start_mask(ctx.teacher_vocab),
            "student_word_start_mask": word_start_mask(ctx.student_vocab)}


def alm_reads_hidden_states(options: Mapping[str, Any]) -> bool:
    return bool(options.get("hidden_weight"))


ALM_SUMMED = ("alm", "hidden_mse", "num_units")  # chunk_logl_gap and teacher_chunk_logl are per-unit averages


@register("alm", count_items=count_alm_items, sum_metrics=ALM_SUMMED, prepare=prepare_alm,
          needs_hidden=alm_reads_hidden_states)
def alm_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
             temperature: float = 100.0, diff: str = "binary_ce", debias: bool = False,
             merge_threshold: float | None = None, hidden_weight: float = 0.0,
             hidden_projection: Callable | None = None, eps: float = 1e-6,
             upcast: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALM over aligned chunks (module docstring). Reads logits, ids, `alignment`; optional word-start masks
    (debias) and hidden states (hidden_weight > 0)."""
    alignment: ChunkAlignment = batch["alignment"]
    n = alignment.num_chunks
    teacher_logits = batch["teacher_logits"].detach()
    t_logp = token_logprobs(teacher_logits, side(batch, "teacher", "input_ids"), upcast)
    s_logp = token_logprobs(batch["student_logits"], side(batch, "student", "input_ids"), upcast)
    t_logl = chunk_sums(t_logp, alignment.teacher_chunk_index, n)
    s_logl = chunk_sums(s_logp, alignment.student_chunk_index, n)
    valid = alm_valid_chunks(alignment)
    count = valid.sum()

    unit_valid, unit_last = valid, torch.arange(n, device=valid.device).expand_as(valid).contiguous()
    if merge_threshold is not None:
        group = merge_chunks(t_logl, valid, math.log(merge_threshold))
        t_logl, s_logl = chunk_sums(t_logl, group, n), chunk_sums(s_logl, group, n)
        unit_valid = chunk_sums(valid.float(), group, n) > 0
        slot = torch.where(group < 0, n, group)
        unit_last = torch.zeros(valid.shape[0], n + 1, dtype=torch.long, device=valid.device).scatter_reduce(
            1, slot, unit_last, "amax")[:, :n]
    if debias:
        needed = unit_valid & alignment.chunk_followed_by_whitespace.gather(1, unit_last)
        t_logl = t_logl + _word_start_logprob(teacher_logits, alignment.teacher_chunk_last.gather(1, unit_last),
                                              needed, batch["teacher_word_start_mask"])
        s_logl = s_logl + _word_start_logprob(batch["student_logits"],
                                              alignment.student_chunk_last.gather(1, unit_last), needed,
                                              batch["student_word_start_mask"])

    per_unit = chunk_difference(t_logl, s_logl, diff, temperature, eps)
    alm_term = normalise((per_unit * unit_valid).sum(), count, num_items)
    loss = alm_term
    with torch.no_grad():
        units = unit_valid.sum().clamp(min=1)
        metrics = {"alm": alm_term.detach(), "num_items_local": count.detach(), "num_units": unit_valid.sum(),
                   "chunk_logl_gap": ((t_logl - s_logl).abs() * unit_valid).sum() / units,
                   "teacher_chunk_logl": (t_logl * unit_valid).sum() / units}
    if hidden_weight:
        hidden = normalise(_hidden_mse(batch, alignment, valid, hidden_projection), count, num_items)
        loss = loss + hidden_weight * hidden
        metrics["hidden_mse"] = hidden.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


@register("alm-l1", count_items=count_alm_items, sum_metrics=ALM_SUMMED, prepare=prepare_alm,
          needs_hidden=alm_reads_hidden_states, options=[o for o in keyword_options(alm_loss) if o != "diff"])
def alm_l1_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
                **options: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALM with |log L_t - log L_s| / tau: no saturation for very likely or very unlikely chunks."""
    return alm_loss(batch, num_items=num_items, diff="l1", **options)
