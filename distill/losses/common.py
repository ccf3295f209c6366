"""Tensor helpers shared by the losses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from distill.chunks import ChunkAlignment


def side(batch: Mapping[str, Any], prefix: str, name: str) -> torch.Tensor:
    """`batch[f"{prefix}_{name}"]`, else the alignment's field of that name (padded ids and masks)."""
    key = f"{prefix}_{name}"
    if key in batch and batch[key] is not None:
        return batch[key]
    return getattr(batch["alignment"], key)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """[B, T]: log p(token t | tokens < t); position 0 has no prediction and holds 0.

    Uses the fused cross-entropy kernel so no second [B, T, V] tensor is materialised; `upcast` computes in
    fp32 (bf16 log-probs are too coarse to sum over a chunk).
    """
    batch, length, vocab = logits.shape
    shifted = logits[:, :-1]
    if upcast and shifted.dtype in (torch.float16, torch.bfloat16):
        shifted = shifted.float()
    nll = F.cross_entropy(shifted.reshape(-1, vocab), input_ids[:, 1:].reshape(-1), reduction="none")
    return F.pad(-nll.view(batch, length - 1).to(torch.promote_types(nll.dtype, torch.float32)), (1, 0))


def fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to fp32 and keep fp64 (tests compute exact values in fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def chunk_sums(values: torch.Tensor, chunk_index: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """[B, C]: per-chunk sum of token values; equal to `values @ token_to_chunk` with the one-hot matrix."""
    slot = torch.where(chunk_index < 0, num_chunks, chunk_index)
    out = values.new_zeros(values.shape[0], num_chunks + 1)
    return out.scatter_add(1, slot, values * (chunk_index >= 0))[:, :num_chunks]


def rows_at(tensor: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, ...]: tensor[b, positions[b, c]] for every (b, c) where mask, in row-major order."""
    batch_idx, chunk_idx = torch.nonzero(mask, as_tuple=True)
    return tensor[batch_idx, positions[batch_idx, chunk_idx]]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012: expm1 near 0, log1p far away)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def normalise(total: torch.Tensor, local_count: torch.Tensor,
              num_items: float | torch.Tensor | None) -> torch.Tensor:
    denominator = local_count.clamp(min=1) if num_items is None else num_items
    return total / denominator


def alm_valid_chunks(alignment: ChunkAlignment) -> torch.Tensor:
    """Bool [B, C]: chunks whose every token on both sides has a prediction (none sits at position 0)."""
    return alignment.chunk_mask & (alignment.teacher_chunk_first >= 1) & (alignment.student_chunk_first >= 1)


def pad_vocab(mask: torch.Tensor, size: int, fill: Any) -> torch.Tensor:
    """A per-vocab tensor cut or extended (with `fill`) to the logits' vocab size, which may be padded
    beyond the tokenizer's (`pad_to_multiple_of`): the one vocab-padding helper of the losses."""
    if mask.shape[0] >= size:
        return mask[:size]
    return torch.cat([mask, mask.new_full((size - mask.shape[0],), fill)])
