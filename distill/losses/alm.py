"""Approximate Likelihood Matching (ALM; Minixhofer et al., "Cross-Tokenizer Distillation via Approximate
Likelihood Matching").

Two tokenizers rarely predict the same next token, but over an aligned chunk (same bytes on both sides) both
models assign a likelihood to the same event: "the text continues with these bytes". ALM makes the student's
chunk likelihoods match the teacher's: the loss itself has no next-token target. As registered it is trained
together with the student's own next-token CE (`ce_weight` 1.0, GradMag-balanced: `distill.losses.balance`),
as the reference runs tokenizer transfer; `loss.ce_weight: 0` gives ALM alone.

Per chunk and side, log L = sum of the log-probs of the chunk's tokens (a scatter-add over the token -> chunk
index, i.e. the matmul with the one-hot token x chunk matrix). Chunks become compared *units* by merging and
debiasing (`distill.losses.units`; default `debias: merge`, the reference's
"merge_by_space_prob+append_space" with threshold 0.1). With a = log L_t / tau and b = log L_s / tau per unit,
the default difference is the binarised cross-entropy between Bernoulli(p_t = e^a) and Bernoulli(p_s = e^b):
    -(p_t * b + (1 - p_t) * log(1 - e^b)),
computed in log space (log1mexp). It is minimal (= the teacher's binary entropy) exactly when the likelihoods
match; "binary_kl" subtracts that entropy so the minimum is 0; "l1" (registered as `alm-l1`) is |a - b|.
tau (default 100, the reference's `binarization_temp`) spreads the informative range over low-likelihood
units: at tau = 1 a unit with likelihood e^-10 would contribute almost nothing.

Options:
- `debias`: merge (default) | append | whitespace (this project's first version) | none; see `units`.
  `boundary_threshold` (0.1) is the teacher P(boundary) that closes a merged unit.
- `merge_threshold`: the older likelihood-based merging (`units.likelihood_units`), only without `merge`.
- `hidden_weight` > 0 adds the channel-normalised hidden-state term (`distill.losses.hidden`) at chunk ends;
  `hidden_projection`: auto (a trainable projection when hidden sizes differ) | always | never.
- `per`: units (default, as the reference: the mean over merged units) | chunks (this project's first version:
  the sum over units divided by the valid chunks before merging). They are not a rescaling of each other:
  units per chunk is 0.93 on English and 0.62 on code (merging joins more on code), so `chunks` down-weights
  code.
Items (the count the trainer all-reduces before the forward, for global normalisation) are valid chunks:
complete on both sides, no token at position 0. Units are only known after the teacher's forward, so `per:
units` divides each micro-batch by its own units and weights it by its share of the global chunks: exactly
the reference's mean on one micro-batch per step, a chunk-weighted mean of per-batch unit means otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from distill.chunks import ChunkAlignment, boundary_mask, word_start_mask
from distill.losses.common import (
    alm_valid_chunks,
    chunk_sums,
    log1mexp,
    normalise,
    side,
    token_logprobs,
)
from distill.losses.hidden import PROJECTION, PROJECTION_MODES, hidden_state_term, projection_modules
from distill.losses.registry import Option, PairContext, register
from distill.losses.units import (
    DEBIAS_MODES,
    adjacent_to_next,
    boundary_units,
    debias_mode,
    likelihood_units,
    next_logprob,
    unit_last_chunk,
)
from transplant.errors import TransplantError

DIFFERENCES = ("binary_ce", "binary_kl", "l1")
NORMALISERS = ("units", "chunks")


def chunk_difference(teacher_logl: torch.Tensor, student_logl: torch.Tensor, diff: str = "binary_ce",
                     temperature: float = 100.0, eps: float = 1e-6) -> torch.Tensor:
    """Elementwise ALM difference between unit log-likelihoods (see module docstring)."""
    a = (teacher_logl / temperature).clamp(max=0.0)
    b = student_logl / temperature
    if diff == "l1":
        return (a - b).abs()
    if diff not in DIFFERENCES:
        raise TransplantError(f"unknown ALM difference {diff!r}; choose one of: {', '.join(DIFFERENCES)}")
    # A unit of probability ~1 has log(1 - p) = -inf; clamping keeps the loss finite (its gradient is then 0).
    b = b.clamp(max=-eps)
    p_t = torch.exp(a)
    cross = -(p_t * b + (1.0 - p_t) * log1mexp(b))
    if diff == "binary_ce":
        return cross
    a = a.clamp(max=-eps)
    return cross + (p_t * a + (1.0 - p_t) * log1mexp(a))


def count_alm_items(batch: Mapping[str, Any]) -> int:
    return int(alm_valid_chunks(batch["alignment"]).sum())


def prepare_alm(ctx: PairContext) -> dict[str, torch.Tensor]:
    """Both vocabularies' event masks for the debias mode (vocab-sized: built once, not per batch)."""
    mode = debias_mode(ctx.options["debias"])  # complete: distill.losses.loss_options
    if mode in ("merge", "append"):
        return {"teacher_boundary_mask": boundary_mask(ctx.teacher_vocab),
                "student_boundary_mask": boundary_mask(ctx.student_vocab)}
    if mode == "whitespace":
        return {"teacher_word_start_mask": word_start_mask(ctx.teacher_vocab),
                "student_word_start_mask": word_start_mask(ctx.student_vocab)}
    return {}


def alm_reads_hidden_states(options: Mapping[str, Any]) -> bool:
    return bool(options["hidden_weight"])


def _units(mode: str, batch: Mapping[str, Any], alignment: ChunkAlignment, valid: torch.Tensor,
           t_logl: torch.Tensor, boundary_threshold: float,
           merge_threshold: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit id per chunk [B, C], teacher and student log P(event) to append per unit [B, C])."""
    n = valid.shape[1]
    teacher_logits = batch["teacher_logits"].detach()
    if mode in ("merge", "append"):
        t_event, s_event = batch["teacher_boundary_mask"], batch["student_boundary_mask"]
        if mode == "merge":
            t_chunk_logb = next_logprob(teacher_logits, alignment.teacher_chunk_last, valid, t_event)
            units = boundary_units(valid, t_chunk_logb, adjacent_to_next(alignment), boundary_threshold)
        else:
            units = torch.where(valid, torch.arange(n, device=valid.device).expand_as(valid), -1)
        needed = chunk_sums(valid.to(t_logl.dtype), units, n) > 0
    else:
        units = torch.where(valid, torch.arange(n, device=valid.device).expand_as(valid), -1)
        if merge_threshold is not None:
            units = likelihood_units(t_logl, valid, math.log(merge_threshold))
        unit_valid = chunk_sums(valid.to(t_logl.dtype), units, n) > 0
        if mode == "none":
            zero = torch.zeros_like(t_logl)
            return units, zero, zero
        t_event, s_event = batch["teacher_word_start_mask"], batch["student_word_start_mask"]
        needed = unit_valid & alignment.chunk_followed_by_whitespace.gather(1, unit_last_chunk(units))
    last = unit_last_chunk(units)
    if mode == "merge":  # the teacher's side was computed for every chunk to merge: read it at unit ends
        t_append = torch.where(needed, t_chunk_logb.gather(1, last), 0.0)
    else:
        t_append = next_logprob(teacher_logits, alignment.teacher_chunk_last.gather(1, last), needed, t_event)
    s_append = next_logprob(batch["student_logits"], alignment.student_chunk_last.gather(1, last),
                            needed, s_event)
    return units, t_append, s_append


def _debias(value: object) -> object:
    """Booleans (older recipes) as their mode; anything else is checked against the choices."""
    return debias_mode(value) if value is None or isinstance(value, bool) else str(value)


ALM_OPTIONS = (
    Option("temperature", float, 100.0, "tau: unit log-likelihoods are divided by it (the reference's "
           "binarization_temp)", min=0.0),
    Option("diff", str, "binary_ce", "how unit likelihoods are compared", choices=DIFFERENCES),
    Option("debias", str, "merge", "how chunks become units (true = merge, false = none)",
           choices=DEBIAS_MODES, parse=_debias),
    Option("boundary_threshold", float, 0.1, "teacher P(boundary) that closes a merged unit",
           min=0.0, max=1.0),
    Option("merge_threshold", float, None, "likelihood merging (older; not with debias=merge)",
           min=0.0, max=1.0),
    Option("hidden_weight", float, 0.0, "weight of the hidden-state term (0: off)", min=0.0),
    Option("hidden_projection", str, "auto", "trainable student -> teacher projection of hidden states",
           choices=PROJECTION_MODES),
    Option("per", str, "units", "normalise by merged units (as the reference) or by chunks",
           choices=NORMALISERS),
    Option("eps", float, 1e-6, "clamp keeping log(1 - p) finite", min=0.0),
    Option("upcast", bool, True, "log-softmax in float32"),
)


@register("alm", count_items=count_alm_items, sum_metrics=("alm", "hidden_mse", "num_units"),
          prepare=prepare_alm, needs_hidden=alm_reads_hidden_states, modules=projection_modules,
          ce_weight=1.0, balance="gradmag", options=ALM_OPTIONS)
def alm_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
             temperature: float = 100.0, diff: str = "binary_ce", debias: str | bool = "merge",
             boundary_threshold: float = 0.1, merge_threshold: float | None = None,
             hidden_weight: float = 0.0, hidden_projection: str = "auto", per: str = "units",
             eps: float = 1e-6, upcast: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALM over aligned units (module docstring). Reads logits, ids, `alignment`; the event masks of the
    debias mode (from `prepare_alm`); hidden states and the `hidden_projection` module when hidden_weight >
    0."""
    mode = debias_mode(debias)
    if merge_threshold is not None and mode == "merge":
        raise TransplantError("loss.options.alm.merge_threshold (likelihood merging) does not combine with "
                              "debias=merge (boundary merging); drop one of them")
    alignment: ChunkAlignment = batch["alignment"]
    n = alignment.num_chunks
    t_logp = token_logprobs(batch["teacher_logits"].detach(), side(batch, "teacher", "input_ids"), upcast)
    s_logp = token_logprobs(batch["student_logits"], side(batch, "student", "input_ids"), upcast)
    t_logl = chunk_sums(t_logp, alignment.teacher_chunk_index, n)
    s_logl = chunk_sums(s_logp, alignment.student_chunk_index, n)
    valid = alm_valid_chunks(alignment)
    count = valid.sum()

    units, t_append, s_append = _units(mode, batch, alignment, valid, t_logl, boundary_threshold,
                                       merge_threshold)
    unit_valid = chunk_sums(valid.to(t_logl.dtype), units, n) > 0
    t_unit = chunk_sums(t_logl, units, n) + t_append
    s_unit = chunk_sums(s_logl, units, n) + s_append

    per_unit = chunk_difference(t_unit, s_unit, diff, temperature, eps)
    total = (per_unit * unit_valid).sum()
    if per == "units":  # mean over this batch's units, weighted by its share of the global chunk count
        total = total * count / unit_valid.sum().clamp(min=1)
    elif per != "chunks":
        raise TransplantError(f"loss.options.alm.per={per!r} is unknown; use one of {', '.join(NORMALISERS)}")
    alm_term = normalise(total, count, num_items)
    loss = alm_term
    with torch.no_grad():
        n_units = unit_valid.sum()
        metrics = {"alm": alm_term.detach(), "num_items_local": count.detach(), "num_units": n_units,
                   "chunk_logl_gap": ((t_unit - s_unit).abs() * unit_valid).sum() / n_units.clamp(min=1),
                   "teacher_chunk_logl": (t_unit * unit_valid).sum() / n_units.clamp(min=1)}
    if hidden_weight:
        hidden = normalise(hidden_state_term(batch, alignment, valid), count, num_items)
        loss = loss + hidden_weight * hidden
        metrics["hidden_mse"] = hidden.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


@register("alm-l1", count_items=count_alm_items, sum_metrics=("alm", "hidden_mse", "num_units"),
          prepare=prepare_alm, needs_hidden=alm_reads_hidden_states, modules=projection_modules,
          options=tuple(o for o in ALM_OPTIONS if o.name != "diff"))
def alm_l1_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
                **options: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALM with |log L_t - log L_s| / tau: no saturation for very likely or very unlikely units."""
    return alm_loss(batch, num_items=num_items, diff="l1", **options)


__all__ = ["DIFFERENCES", "NORMALISERS", "PROJECTION", "alm_l1_loss", "alm_loss", "chunk_difference",
           "count_alm_items", "prepare_alm"]
