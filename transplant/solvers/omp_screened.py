"""Exact OMP with reduced-precision screening: the GPU path of `transplant.solvers.omp.omp` (see its module
docstring). Each step's correlations with all N atoms are one bf16 GEMM on tensor cores; the top few are
re-checked in fp32 and a rounding-error bound certifies that the best of them is the fp32 argmax, else the row
redoes the step in fp32. Plain OMP pays an fp32 GEMM per step (mergekit's `batch_omp`); Batch-OMP's Gram
updates read N·k²/2 values per target, memory-bound at large k on a GPU (bench/RESULTS.md, "GPU")."""

from __future__ import annotations

import torch
from torch import Tensor

from transplant.solvers.omp_common import BATCH_BUDGET_BYTES, grow_cholesky


class ScreenedPursuit:
    """Per-call state of the screened pursuit (the dictionary in the screening dtype, the error bound); called
    on one batch of targets as `omp`'s batch loop calls its other pursuit."""

    def __init__(self, atoms: Tensor, valid: Tensor, steps: int, screen_dtype: torch.dtype, screen_top: int):
        self.atoms, self.valid, self.steps = atoms, valid, steps
        self.screen_atoms = atoms.to(screen_dtype).masked_fill_(~valid[:, None], 0)
        unit = torch.finfo(screen_dtype).eps / 2  # unit roundoff: 2^-8 for bf16
        self.rel_bound = 2 * unit + unit * unit + atoms.shape[1] * 2.0**-24 * (1 + 2 * unit)
        self.top = min(max(screen_top, 2), atoms.shape[0])
        self.redone = 0  # target-steps that fell back to fp32 correlations

    def batch_size(self, device: torch.device) -> int:
        """Targets per batch: [B, N] fp32 scores + [B, top, D] gathers + [B, k, D] chosen atoms in the
        budget."""
        n_atoms, dim = self.atoms.shape
        per_target = 4 * (2 * n_atoms + (self.top + self.steps + 2) * dim) + 2 * dim
        return max(1, BATCH_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"] // per_target)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        chosen, kept, gamma, redone = _pursue_screened(x, self.atoms, self.screen_atoms, self.valid,
                                                       self.steps, self.top, self.rel_bound)
        self.redone += redone
        return chosen, kept, gamma


def _pursue_screened(x: Tensor, atoms: Tensor, screen_atoms: Tensor, valid: Tensor, steps: int, top: int,
                     rel_bound: float) -> tuple[Tensor, Tensor, Tensor, int]:
    """Greedy support selection with screened correlations. Returns (indices [B, k], kept [B, k], unit-atom
    coefficients [B, k], how many target-steps fell back to fp32 correlations)."""
    batch, dim = x.shape
    dtype, device = x.dtype, x.device
    eps = torch.finfo(dtype).eps
    stop_rtol, dependent_tol = 100 * eps, 100 * eps
    rows = torch.arange(batch, device=device)
    x_norm = x.norm(dim=1)
    blocked = (~valid).expand(batch, -1).clone()  # zero atoms and picks never win
    chosen = torch.zeros(batch, steps, dtype=torch.long, device=device)
    kept = torch.zeros(batch, steps, dtype=torch.bool, device=device)
    chosen_atoms = torch.zeros(batch, steps, dim, dtype=dtype, device=device)
    chol = torch.eye(steps, dtype=dtype, device=device).expand(batch, -1, -1).clone()  # L·Lᵀ = G[S, S]
    forward = torch.zeros(batch, steps, dtype=dtype, device=device)  # z with L·z = Aₛ·x
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    residual, redone = x, 0
    for step in range(steps):
        screened = (residual.to(screen_atoms.dtype) @ screen_atoms.T).float().abs_()
        screened.masked_fill_(blocked, -1.0)
        values, candidates = screened.topk(top, dim=1)  # [B, top], descending
        exact = torch.bmm(atoms[candidates], residual[:, :, None])[:, :, 0].abs_()  # fp32 re-check
        exact.masked_fill_(values < 0, -1.0)
        best, at = exact.max(dim=1)
        pick = candidates[rows, at]
        # Any atom outside the top has |corr| <= its screened value + bound <= values[:, -1] + bound.
        uncertain = (values[:, -1] + rel_bound * residual.norm(dim=1) >= best) & (values[:, -1] >= 0) & ~done
        if bool(uncertain.any()):
            redo = uncertain.nonzero().flatten()
            redone += redo.numel()
            full = (residual[redo] @ atoms.T).abs_().masked_fill_(blocked[redo], -1.0)
            best[redo], pick[redo] = full.max(dim=1)
        done |= best <= stop_rtol * x_norm
        atom = atoms[pick]
        keep = grow_cholesky(chol, forward, chosen_atoms, atom, (x * atom).sum(dim=1), step, done,
                             dependent_tol)
        chosen[:, step] = pick * keep
        kept[:, step] = keep
        blocked[rows, pick] = True
        if step + 1 < steps:
            size = step + 1
            gamma = torch.linalg.solve_triangular(chol[:, :size, :size].mT,
                                                  forward[:, :size, None], upper=True)
            residual = x - torch.bmm(gamma.mT, chosen_atoms[:, :size])[:, 0]
    gamma = torch.linalg.solve_triangular(chol.mT, forward[:, :, None], upper=True)[:, :, 0]
    return chosen, kept, gamma, redone
