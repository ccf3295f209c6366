"""ALM's hidden-state term: the student's last hidden state matched to the teacher's where both have read the
same bytes (the last token of every aligned chunk).

As in the reference (tokenkit `latents_normalization = "l2_channelwise"`), each channel's squared error is
divided by the teacher's second moment of that channel over the micro-batch's aligned positions, so channels
of large magnitude (outlier features, common in LLM residual streams) do not drown out the rest and the term's
scale does not depend on the model: a student that outputs zeros scores 1 per position. When the hidden sizes
differ, a trainable linear map (student -> teacher, with bias; `latents_do_project` in the reference) is
applied to the student first; it is a module of the student (`LOSS_MODULES`) so DeepSpeed trains, shards and
checkpoints it like any weight, and the export drops it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distill.chunks import ChunkAlignment
from distill.losses.common import fp32, rows_at
from distill.losses.registry import PairContext
from transplant.errors import TransplantError

PROJECTION = "hidden_projection"  # the batch key (and module name) of the trainable student -> teacher map
PROJECTION_MODES = ("auto", "always", "never")


def channel_normalised_mse(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Sum over rows of mean_d (s[n, d] - t[n, d])^2 / (mean_n t[n, d]^2 + eps); student and teacher [N, D].

    The denominator is detached (the teacher is): the per-channel second moment of the teacher rows."""
    teacher = fp32(teacher.detach())
    second_moment = (teacher ** 2).mean(0, keepdim=True) if teacher.shape[0] else teacher.new_ones(1, 1)
    return (((fp32(student) - teacher) ** 2) / (second_moment + eps)).mean(-1).sum()


def hidden_state_term(batch: Mapping[str, Any], alignment: ChunkAlignment,
                      valid: torch.Tensor) -> torch.Tensor:
    """Sum over valid chunks of the channel-normalised squared error at the chunks' last tokens."""
    student = rows_at(batch["student_hidden_states"], alignment.student_chunk_last, valid)
    teacher = rows_at(batch["teacher_hidden_states"].detach(), alignment.teacher_chunk_last, valid)
    projection = batch.get(PROJECTION)
    if projection is not None:
        student = projection(student.to(next(projection.parameters()).dtype))
    if student.shape[-1] != teacher.shape[-1]:
        raise TransplantError(f"hidden sizes differ (student {student.shape[-1]}, teacher "
                              f"{teacher.shape[-1]}); "
                              "set loss.options.alm.hidden_projection=auto (a trainable projection)")
    return channel_normalised_mse(student, teacher)


def projection_modules(ctx: PairContext) -> dict[str, nn.Module]:
    """The trainable student -> teacher projection, when the hidden term is on and the recipe (or a hidden
    size mismatch under `auto`) asks for it. Seeded, so every rank builds the same initial weights."""
    options = ctx.options
    mode = options[PROJECTION]  # complete: distill.losses.loss_options
    if mode not in PROJECTION_MODES:
        raise TransplantError(f"loss.options.alm.{PROJECTION}={mode!r} is unknown; use one of "
                              f"{', '.join(PROJECTION_MODES)}")
    if not options["hidden_weight"] or mode == "never":
        return {}
    sizes = (ctx.student_hidden_size, ctx.teacher_hidden_size)
    if None in sizes:
        raise TransplantError("the hidden-state term needs both models' hidden sizes; load the models first")
    if mode == "auto" and sizes[0] == sizes[1]:
        return {}
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(*sizes)
    with torch.no_grad():
        bound = 1.0 / sizes[0] ** 0.5
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.zero_()
    return {PROJECTION: linear}
