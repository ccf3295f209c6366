"""Pieces both OMP pursuits share (transplant/solvers/omp.py, omp_screened.py): the incremental Cholesky factor
of the chosen atoms' Gram matrix, the float64 refit on the final support, input checks, batch budgets."""

from __future__ import annotations

import torch
from torch import Tensor

from transplant.errors import TransplantError

# Per-call working set the automatic batch size aims at (bigger batches only help the GPU's GEMMs).
BATCH_BUDGET_BYTES = {"cpu": 512 * 2**20, "cuda": 4 * 2**30}


def grow_cholesky(chol: Tensor, forward: Tensor, chosen_atoms: Tensor, atom: Tensor, correlation: Tensor, step: int,
                  done: Tensor, dependent_tol: float) -> Tensor:
    """Add `atom` [B, D] (unit norm) as support slot `step`, in place: row `step` of L (L·Lᵀ = G[S, S], computed
    from the atoms themselves, so a reduced-precision Gram never touches the coefficients), the forward-solve
    entry z (L·z = Aₛ·x; `correlation` [B] is atom·x) and the chosen-atom buffer [B, k, D]. Returns the kept
    mask [B]: an atom in the span of the chosen ones has no correlation left in exact arithmetic and can only
    win through rounding, so it is skipped (slot stays padded) instead of breaking the factorisation."""
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


def check_finite(row_norms: Tensor, name: str, offset: int) -> None:
    """A row holding NaN/Inf has a non-finite norm; checking norms costs O(rows), not O(rows·D)."""
    bad_rows = (~torch.isfinite(row_norms)).nonzero().flatten()
    if bad_rows.numel():
        raise TransplantError(f"OMP {name} contain NaN/Inf in {bad_rows.numel()} rows (first: row "
                              f"{offset + int(bad_rows[0])}); fix or drop those embedding rows before "
                              "initialising")


def refit(x: Tensor, raw: Tensor, norms: Tensor, chosen: Tensor, kept: Tensor, gamma: Tensor) -> Tensor:
    """Least squares on the chosen support in float64 (Cholesky of the k×k normal equations of the unit-norm
    atoms), then rescaled to the raw atoms. Rows whose factorisation fails keep the pursuit's solution."""
    scale = norms[chosen].to(torch.float64)
    scale = scale.where(kept, torch.ones_like(scale))
    sub = raw[chosen].to(torch.float64) / scale[:, :, None] * kept[:, :, None]  # [B, k, D]
    normal = sub @ sub.mT + torch.diag_embed((~kept).to(torch.float64))
    rhs = sub @ x.to(torch.float64)[:, :, None]
    factor, info = torch.linalg.cholesky_ex(normal)
    solved = torch.cholesky_solve(rhs, factor)[:, :, 0]
    coefs = torch.where((info == 0)[:, None], solved, gamma.to(torch.float64))
    coefs = torch.nan_to_num(coefs / scale * kept, nan=0.0, posinf=0.0, neginf=0.0)
    return coefs.to(torch.float32)
