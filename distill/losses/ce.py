"""Plain next-token cross-entropy on the student (SFT baseline, and the anchor term of hybrid objectives).

As a baseline it is plain SFT on the training text: no teacher, no extra terms. ULD and MinED add it with
their papers' weights (their registered `ce_weight`); ALM adds it too (weight 1.0, GradMag-balanced, as its
reference runs tokenizer transfer); `loss.ce_weight: 0` makes any of them pure distillation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distill.losses.common import normalise, side, token_logprobs
from distill.losses.registry import Option, register


def _predicted_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    mask = side(batch, "student", "attention_mask").bool()
    return torch.nn.functional.pad(mask[:, 1:] & mask[:, :-1], (1, 0))


def count_ce_items(batch: Mapping[str, Any]) -> int:
    return int(_predicted_tokens(batch).sum())


@register("ce", count_items=count_ce_items, needs_teacher=False, sum_metrics=("ce",),
          options=(Option("upcast", bool, True, "log-softmax in float32"),))
def ce_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
            upcast: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood of the student's own next tokens.

    Needs no teacher: it is the baseline every distillation objective must beat, and the loss to report
    when checking that the student still models text. Items are predicted tokens (position >= 1, both the
    token and its predecessor inside the attention mask).
    """
    logp = token_logprobs(batch["student_logits"], side(batch, "student", "input_ids"), upcast)
    predicted = _predicted_tokens(batch)
    count = predicted.sum()
    loss = normalise(-(logp * predicted).sum(), count, num_items)
    return loss, {"loss": loss.detach(), "ce": loss.detach(), "num_items_local": count.detach()}
