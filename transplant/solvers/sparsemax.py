"""Sparsemax (Martins & Astudillo, 2016), the weighting FOCUS uses over overlapping tokens.

Softmax gives every candidate some weight; sparsemax is the Euclidean projection of the scores onto the
probability simplex, so weak candidates get exactly zero and a new token's row is a combination of the few
tokens that really resemble it: a sparse initializer row (docs/design.md §2) with no threshold to tune.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sparsemax(scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Project `scores` onto the simplex along `dim`: p = max(scores − τ, 0) with τ chosen so that Σp = 1.

    `mask` (bool, broadcastable to `scores`) marks the allowed entries; the others get weight 0, and a slice
    with no allowed entry is all zeros (instead of NaN). Non-finite scores (-inf, NaN) count as masked.
    Computed in float32 (float64 stays float64), returned in that dtype.
    """
    work_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    z = scores.to(work_dtype).movedim(dim, -1)
    allowed = torch.isfinite(z) if z.numel() else torch.ones_like(z, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask.to(torch.bool).broadcast_to(scores.shape).movedim(dim, -1)
    # Masked entries sink below every allowed one, so they sort last and never enter the support.
    finite_min = torch.where(allowed, z, torch.zeros_like(z)).amin(dim=-1, keepdim=True)
    z = torch.where(allowed, z, finite_min - 1.0)
    ordered = z.sort(dim=-1, descending=True).values
    ranks = torch.arange(1, z.shape[-1] + 1, dtype=work_dtype, device=z.device)
    cumulative = ordered.cumsum(dim=-1)
    n_allowed = allowed.sum(dim=-1, keepdim=True)
    in_support = (1 + ranks * ordered > cumulative) & (ranks <= n_allowed)
    support_size = in_support.sum(dim=-1, keepdim=True).clamp_min(1)
    tau = (cumulative.gather(-1, support_size - 1) - 1) / support_size.to(work_dtype)
    probs = (z - tau).clamp_min(0) * allowed
    probs = torch.where(n_allowed > 0, probs, torch.zeros_like(probs))
    return probs.movedim(-1, dim)
