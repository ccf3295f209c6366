"""A throwaway distillation loss, as an outside package would ship it: one module with one `@register`, found
through a `tokentransplant.losses` entry point (tests/test_loss_plugin.py installs a fake distribution naming
this module). Not a test module: pytest never imports it, only the registry does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distill.losses import Option, PairContext, register
from distill.losses.common import alm_valid_chunks, chunk_sums, normalise, token_logprobs

NAME = "test-chunk-rate"


def token_bytes(ctx: PairContext) -> dict[str, torch.Tensor]:
    """Bytes per student token, a per-pair table built once."""
    return {"token_bytes": torch.tensor([len(b) for b in ctx.student_vocab.token_bytes])}


@register(NAME, count_items=lambda batch: int(alm_valid_chunks(batch["alignment"]).sum()),
          sum_metrics=("chunk_rate", "chunks"), prepare=token_bytes,
          options=(Option("scale", float, 1.0, "factor on the loss", min=0.0, max=10.0),))
def chunk_rate_loss(batch: Mapping[str, Any], *, num_items: float | None = None,
                    scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Squared gap between teacher and student log-likelihood per byte of each chunk (a toy plug-in)."""
    a = batch["alignment"]
    teacher = chunk_sums(token_logprobs(batch["teacher_logits"].detach(), a.teacher_input_ids),
                         a.teacher_chunk_index, a.num_chunks)
    student = chunk_sums(token_logprobs(batch["student_logits"], a.student_input_ids),
                         a.student_chunk_index, a.num_chunks)
    nbytes = chunk_sums(batch["token_bytes"][a.student_input_ids].to(student.dtype), a.student_chunk_index,
                        a.num_chunks).clamp(min=1)
    valid = alm_valid_chunks(a)
    count = valid.sum()
    loss = normalise(scale * (((teacher - student) / nbytes) ** 2 * valid).sum(), count, num_items)
    chunks = count.detach().float()
    return loss, {"loss": loss.detach(), "chunk_rate": loss.detach(), "num_items_local": count.detach(),
                  "chunks": chunks, "chunks_per_micro_batch": chunks}
