"""Pieces both OMP pursuits share (transplant/solvers/omp.py, omp_screened.py): the incremental Cholesky
factor of the chosen atoms' Gram matrix and the batch memory budgets."""

from __future__ import annotations

import torch
from torch import Tensor

# Per-call working set the automatic batch size aims at (bigger batches only help the GPU's GEMMs).
BATCH_BUDGET_BYTES = {"cpu": 512 * 2**20, "cuda": 4 * 2**30}


def grow_cholesky(chol: Tensor, forward: Tensor, chosen_atoms: Tensor, atom: Tensor, correlation: Tensor,
                  step: int, done: Tensor, dependent_tol: float) -> Tensor:
    """Add `atom` [B, D] (unit norm) as support slot `step`, in place: row `step` of L (L·Lᵀ = G[S, S],
    computed from the atoms themselves, so a reduced-precision Gram never touches the coefficients), the
    forward-solve entry z (L·z = Aₛ·x; `correlation` [B] is atom·x) and the chosen-atom buffer [B, k, D].
    Returns the kept mask [B]: an atom in the span of the chosen ones has no correlation left in exact
    arithmetic and can only win through rounding, so it is skipped (slot stays padded) instead of breaking the
    factorisation."""
    if step:
        overlap = torch.bmm(chosen_atoms[:, :step], atom[:, :, None])  # G[S, new]
        w = torch.linalg.solve_triangular(chol[:, :step, :step], overlap, upper=False)[:, :, 0]
        d2 = 1.0 - (w * w).sum(dim=1)
    else:
        w = atom.new_zeros(atom.shape[0], 0)
        d2 = torch.ones_like(correlation)
    keep = ~done & (d2 > dependent_tol)
    d = torch.where(keep, d2.clamp_min(dependent_tol).sqrt(), torch.ones_like(d2))
    chol[:, step, :step] = w * keep[:, None]
    chol[:, step, step] = d
    forward[:, step] = (correlation - (w * forward[:, :step]).sum(dim=1)) / d * keep
    chosen_atoms[:, step] = atom * keep[:, None]
    return keep
