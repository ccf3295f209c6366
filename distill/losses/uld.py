"""Universal Logit Distillation (ULD; Boizard et al., 2024).

Two vocabularies have no shared coordinates, but a distribution's *sorted* probability vector does not depend
on which token is which. ULD compares the teacher's and student's sorted next-token probabilities, the shorter
zero-padded; with both sorted, sum |p_t(i) - p_s(i)| is the closed-form Wasserstein-1 distance between the two
distributions under the rank-matching the original paper uses. It matches confidence shape only, never which
token is predicted, so it is a weak but tokenizer-agnostic baseline.

Positions: the last token of every chunk on each side. There both models have read exactly the same bytes and
predict what follows, so the two distributions are about the same event. Items are valid chunks. (The paper
pairs positions by index within the answer, truncating the longer side; byte-aligned chunk ends are the same
idea without the drift that index pairing accumulates when the tokenizers split differently.)

Settings as published (Boizard et al., the `llm-recipes` distillation config): L = 1.0 * CE + 1.5 * ULD, both
temperatures 1. The CE term is the student's own next-token loss, which the trainer adds with this loss's
registered `ce_weight` (1.0) unless the recipe sets `loss.ce_weight`; `weight` (1.5) scales the ULD term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distill.losses.common import fp32, normalise, rows_at
from distill.losses.registry import Option, register


def sorted_probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    probs = torch.softmax(fp32(logits) / temperature, dim=-1)
    if top_k is not None and top_k < probs.shape[-1]:
        return torch.topk(probs, top_k, dim=-1).values
    return torch.sort(probs, dim=-1, descending=True).values


def count_chunk_items(batch: Mapping[str, Any]) -> int:
    return int(batch["alignment"].chunk_mask.sum())


ULD_WEIGHT = 1.5  # the paper's lambda (distil_factor); CE weight 1.0 (cross_entropy_factor)
ULD_CE_WEIGHT = 1.0


ULD_OPTIONS = (
    Option("temperature", float, 1.0, "softmax temperature of both sides", min=0.0),
    Option("top_k", int, None, "keep the k largest probabilities per side (unset: all)", min=1),
    Option("weight", float, ULD_WEIGHT, "weight of the ULD term (the paper's lambda)", min=0.0),
)


@register("uld", count_items=count_chunk_items, sum_metrics=("uld",), ce_weight=ULD_CE_WEIGHT,
          options=ULD_OPTIONS)
def uld_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
             temperature: float = 1.0, top_k: int | None = None,
             weight: float = ULD_WEIGHT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`weight` x L1 between sorted probability vectors at chunk ends (metric "uld": the unweighted term).
    `top_k` keeps the k largest probabilities per side (sorting a 262k vocab per position is the cost; the
    tail carries little mass)."""
    alignment = batch["alignment"]
    valid = alignment.chunk_mask
    teacher = sorted_probs(rows_at(batch["teacher_logits"].detach(), alignment.teacher_chunk_last, valid),
                           temperature, top_k)
    student = sorted_probs(rows_at(batch["student_logits"], alignment.student_chunk_last, valid),
                           temperature, top_k)
    width = max(teacher.shape[-1], student.shape[-1])
    teacher = torch.nn.functional.pad(teacher, (0, width - teacher.shape[-1]))
    student = torch.nn.functional.pad(student, (0, width - student.shape[-1]))
    count = valid.sum()
    term = normalise((teacher - student).abs().sum(), count, num_items)
    loss = weight * term
    return loss, {"loss": loss.detach(), "uld": term.detach(), "num_items_local": count.detach()}
