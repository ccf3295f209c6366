"""Batched exact Orthogonal Matching Pursuit (Batch-OMP).

OMP writes each new token's embedding as a k-sparse combination of anchor embeddings. Plain batched OMP
recomputes every anchor's correlation with the residual at every step, one GEMM of O(B·N·D) per step:
mergekit's `batch_omp` needs 4.0 ms/target at k=8 and 34 ms at k=64 on a 210k × 46k × 640 problem on 2 CPU
cores, ours
0.95 / 13.0 ms exact (bench/bench_solver_vs_mergekit.py). Here the pursuit is the same greedy
algorithm (pick the atom with the largest |correlation| with the residual, then least squares on the chosen
set), computed the way Rubinstein, Zibulevsky & Elad (2008) do:

* c0 = x·Aᵀ for a batch of targets is one GEMM; after that the correlations are c0 − γ·G[S, :] with the Gram
  matrix G = A·Aᵀ, so step s costs O(N·s) per target instead of O(N·D) (s ≤ k ≪ D). G (N² entries) is built
  once per call in row blocks and reused for every target; with fp32 it takes 8 GB at N = 45k, so it is
  stored in fp16 when fp32 does not fit (`gram_dtype="auto"`), or skipped (`None`, or nothing fits).
* Step s reads O(N·s) Gram memory per target (bandwidth-bound), a residual GEMM costs a fixed O(N·D) at
  full FLOP rate. On the 2-core CPU here Gram updates won at every step up to k=64 (exploratory sweep,
  N=45k, k=64, 1 thread: 123 ms/target all-Gram, 207 switching at step 32, 306 residual only), so they are
  the default; `gram_steps=g` switches to residual correlations after g steps, which a roofline
  estimate says pays for large k on GPUs (around g ≈ D/20; not measured, no GPU was available). Both exact.
* The least-squares solution uses a Cholesky factor of G[S, S] grown by one row per step. Its entries are
  computed from the chosen atoms themselves (O(s·D)), never from a reduced-precision G, so the Gram dtype
  can only affect which atom wins a near-tie, not the coefficients; the final coefficients are refitted in
  float64 on the chosen support.
* `prefilter=M` pursues, per target, inside the M anchors most correlated with the residual (O(M·s) per
  step with G, O(M·D) without). Approximate. Chosen from c0 alone, the set misses most later picks: after
  the first atom or two the residual points elsewhere. Re-choosing it from exact residual correlations after
  steps 2, 4, 8, … (one GEMM each) fixes most of that (bench, 45k anchors, k=64, M=1024: error +23% over
  exact with c0 alone, +7% refreshed, 3x faster than exact) but costs more than exact Batch-OMP at small k
  (k=8: exact 7.0 ms/target, refreshed 8-12, c0-only 3.4 at +4% error), so it is on for k > 16 only.

* `screen_dtype=torch.bfloat16` (opt-in; meant for GPUs, where it is not yet timed) computes each step's
  residual correlations as one bf16 GEMM on tensor cores (~16x the fp32 rate on an H200) and keeps the
  selection exact with a certificate: the bf16 value of every correlation is within `bound = ‖r‖·(2u + u² +
  D·2⁻²⁴)` of the fp32 one (unit atoms, u = 2⁻⁸), so after re-checking the top `screen_top` screened atoms in
  fp32, the best of them is the exact argmax whenever it beats the next screened value by more than `bound`;
  rows that fail the certificate (near-ties) redo that step's correlations in fp32. Same supports as the fp32
  pursuit, no Gram, O(k·N·D) at bf16 speed.

Selection uses correlations with unit-normalised atoms (|aᵢ·r| / ‖aᵢ‖), i.e. the scale of an embedding row
does not make it more likely to be chosen; the returned coefficients apply to the original (unnormalised)
rows.
Complexity per target (N anchors, D dims, k steps): exact with G: N·D (c0) + N·k²/2 (updates) + k²·D
(Cholesky) plus a one-off N²·D/2 for G; without G: k·N·D; prefilter M: N·D + M·k²/2 with G, N·D + k·M·D
without. Memory per target in flight: N·(k + 8) floats with G; G itself N² in `gram_dtype`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from transplant.errors import TransplantError
from transplant.solvers.omp_common import BATCH_BUDGET_BYTES, grow_cholesky
from transplant.solvers.omp_screened import ScreenedPursuit

logger = logging.getLogger(__name__)

FALLBACK_GRAM_BYTES = 4 * 2**30  # when the available memory cannot be read
_GRAM_BLOCK_ROWS = 2048  # a 2048 x N fp32 block is the only temporary (368 MB at N=45k)


def omp(
    targets: Tensor,
    dictionary: Tensor,
    k: int,
    *,
    prefilter: int | None = None,
    prefilter_refresh: bool | None = None,
    batch_size: int | None = None,
    gram_dtype: torch.dtype | Literal["auto"] | None = "auto",
    max_gram_bytes: int | None = None,
    gram_steps: int | None = None,
    gram: Tensor | None = None,
    device: torch.device | str | None = None,
    screen_dtype: torch.dtype | None = None,
    screen_top: int = 8,
    screen_rank: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sparse-code every row of `targets` [B, D] with at most `k` rows of `dictionary` [N, D].

    Returns `(indices [B, k] int64, coefficients [B, k] float32)` on the targets' device with
    `targets ≈ Σⱼ coefficients[:, j, None] · dictionary[indices[:, j]]`, columns in selection order. The
    output always has k columns; a column that holds no atom carries index 0 with coefficient 0, so the sum
    stays correct: the columns after an early stop (the residual no longer correlates with any atom: exactly
    representable or zero target, k > N) and the rare pick skipped for being linearly dependent on the
    chosen atoms (duplicates; it could only win through rounding). Zero atoms are never chosen.

    `prefilter=M` is the approximate, cheaper pursuit inside M candidates per target (module docstring);
    `prefilter_refresh` re-chooses the M candidates after steps 2, 4, 8, … (None: when k > 16).
    `screen_rank=r` (with `prefilter`) chooses the M candidates from a rank-r projection onto the unit atoms'
    top-r principal directions instead of the exact first correlations: r/D of the first GEMM's FLOPs, no
    Gram, no refresh; the pursuit inside the candidates is exact (bench/RESULTS.md, "Candidates first": +5%
    reconstruction error at r=128, M=512 on SmolLM2 ← Gemma-3).

    Computation runs on `device` (default: the targets' device) in float32 (float64 when both inputs are
    float64); float16/bfloat16 inputs are upcast. The Gram matrix is stored in `gram_dtype`; "auto" takes
    float32 if N² of them fit in `max_gram_bytes`, else float16 (its ~5e-4 error can only flip near-tied
    picks), else none. No Gram (`None`, or too big) means residual GEMMs: same result, O(N·D) per step.
    `max_gram_bytes` defaults to a third of the available RAM (CPU) or half the free GPU memory: an 8 GB Gram
    on a shared 24 GB machine got this process OOM-killed. `gram_steps` overrides where exact pursuit
    switches from Gram updates to residual GEMMs (None: never). `gram` passes a Gram matrix
    from `unit_gram(dictionary)` to reuse across calls on the same dictionary (the one-off N²·D cost).
    `screen_dtype` (exact pursuit only, e.g. bfloat16) screens correlations in that dtype and certifies each
    pick in float32 (module docstring); it replaces the Gram path. Off by default: on this 2-core CPU it is
    slower than the Gram path (bf16 GEMMs gain ~1.35x here), and no GPU has timed it yet.
    """
    if targets.ndim != 2 or dictionary.ndim != 2 or targets.shape[1] != dictionary.shape[1]:
        raise ValueError(f"omp needs targets [B, D] and dictionary [N, D]; got {tuple(targets.shape)} and "
                         f"{tuple(dictionary.shape)}")
    if k < 0 or (prefilter is not None and prefilter < 1):
        raise ValueError(f"omp needs k >= 0 and prefilter >= 1; got k={k}, prefilter={prefilter}")
    if screen_rank is not None and (prefilter is None or screen_rank < 1):
        raise ValueError(f"omp: screen_rank needs a prefilter (candidate count) and rank >= 1; got "
                         f"screen_rank={screen_rank}, prefilter={prefilter}")
    out_device = targets.device
    n_targets, n_atoms = targets.shape[0], dictionary.shape[0]
    empty = (torch.zeros(n_targets, k, dtype=torch.long, device=out_device),
             torch.zeros(n_targets, k, dtype=torch.float32, device=out_device))
    if n_targets == 0 or n_atoms == 0 or k == 0:
        return empty
    device = torch.device(device) if device is not None else targets.device
    work_dtype = torch.float64 if targets.dtype == dictionary.dtype == torch.float64 else torch.float32
    raw = dictionary.to(device)

    steps = min(k, n_atoms)
    candidates = n_atoms if prefilter is None else min(max(prefilter, steps), n_atoms)  # M >= k
    norms, atoms = _unit_atoms(raw, work_dtype)
    check_finite(norms, "dictionary", 0)
    valid = norms > 0
    screened = None
    if screen_dtype is not None and prefilter is None:
        pursue = screened = ScreenedPursuit(atoms, valid, steps, screen_dtype, screen_top)
        batch_size = batch_size or screened.batch_size(device)
        logger.info("OMP: %d targets, %d atoms, k=%d, exact with %s screening (top %d), batch=%d, on %s",
                    n_targets, n_atoms, steps, screen_dtype, screened.top, batch_size, device)
    else:  # Batch-OMP: the Gram matrix is built (or checked) once per call
        if screen_rank is not None:  # candidates from the projection: no Gram, no exact c0 to refresh from
            gram, prefilter_refresh = None, False
        elif gram is not None:
            if gram.shape != (n_atoms, n_atoms):
                raise ValueError(f"omp: gram must be [{n_atoms}, {n_atoms}] (unit_gram(dictionary)); got "
                                 f"{tuple(gram.shape)}")
            gram = gram.to(device)
        else:
            chosen_dtype = _choose_gram_dtype(n_atoms, gram_dtype, max_gram_bytes, device)
            gram = None if chosen_dtype is None else _gram(atoms, chosen_dtype)
        if gram is None:
            n_gram_steps = 0
        elif prefilter is not None:
            n_gram_steps = steps
        else:
            n_gram_steps = steps if gram_steps is None else min(steps, gram_steps)
        if batch_size is None:
            batch_size = _auto_batch_size(n_atoms, candidates, atoms.shape[1], steps, n_gram_steps,
                                          prefilter is not None, gram is not None, device)
        logger.info("OMP: %d targets, %d atoms, k=%d, prefilter=%s, Gram=%s, gram steps=%d, batch=%d, on %s",
                    n_targets, n_atoms, steps, prefilter, None if gram is None else gram.dtype, n_gram_steps,
                    batch_size, device)

        work = _Workspace()
        refresh = steps > 16 if prefilter_refresh is None else prefilter_refresh

        screen = None if screen_rank is None else low_rank_screen(atoms, screen_rank)

        def pursue(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return _pursue(x, atoms, valid, gram, steps, candidates, prefilter is not None, refresh,
                           n_gram_steps, work, screen)

    all_indices, all_coefs = [], []
    for start in tqdm(range(0, n_targets, batch_size), desc="OMP", unit="batch", disable=not progress):
        x = targets[start : start + batch_size].to(device=device, dtype=work_dtype)
        check_finite(x.norm(dim=1), "targets", start)
        chosen, kept, gamma = pursue(x)
        coefs = refit(x, raw, norms, chosen, kept, gamma)
        all_indices.append(chosen.to(out_device))
        all_coefs.append(coefs.to(out_device))
    if screened is not None:
        logger.info("OMP: %d of %d target-steps re-ran their correlations in fp32 (near-ties)",
                    screened.redone, n_targets * steps)
    indices, coefs = torch.cat(all_indices), torch.cat(all_coefs)
    if steps < k:
        indices = torch.cat([indices, empty[0][:, steps:]], dim=1)
        coefs = torch.cat([coefs, empty[1][:, steps:]], dim=1)
    return indices, coefs


def _choose_gram_dtype(n_atoms: int, gram_dtype: torch.dtype | str | None, max_gram_bytes: int | None,
                       device: torch.device) -> torch.dtype | None:
    if gram_dtype is None:
        return None
    budget = _memory_budget(device) if max_gram_bytes is None else max_gram_bytes
    options = (torch.float32, torch.float16) if gram_dtype == "auto" else (gram_dtype,)
    for dtype in options:
        if n_atoms * n_atoms * torch.empty((), dtype=dtype).element_size() <= budget:
            return dtype
    logger.warning("OMP: a %d x %d Gram matrix in %s does not fit in max_gram_bytes=%.1f GiB; using residual "
                   "GEMMs (exact, slower)", n_atoms, n_atoms, options[-1], budget / 2**30)
    return None


def _memory_budget(device: torch.device) -> int:
    """Bytes a Gram matrix may take: half the free GPU memory, or a third of the available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 3
    except (OSError, KeyError, ValueError):
        return FALLBACK_GRAM_BYTES


def unit_gram(dictionary: Tensor, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
    """The Gram matrix of the unit-normalised dictionary rows (zero rows stay zero), as `omp` builds it;
    compute it once to share between calls on the same dictionary."""
    raw = dictionary.to(device if device is not None else dictionary.device)
    work_dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    return _gram(_unit_atoms(raw, work_dtype)[1], dtype)


def _unit_atoms(raw: Tensor, work_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(row norms, rows divided by their norm), both in `work_dtype`; zero rows stay zero."""
    atoms = raw.to(work_dtype)
    norms = atoms.norm(dim=1)
    atoms = atoms / norms.clamp_min(torch.finfo(work_dtype).tiny)[:, None]
    return norms, atoms


def _gram(atoms: Tensor, dtype: torch.dtype) -> Tensor:
    """G = A·Aᵀ by row blocks of the upper triangle, mirrored: half the FLOPs of one GEMM, and the only
    full-size buffer is G itself, in its storage dtype."""
    n = atoms.shape[0]
    gram = torch.empty(n, n, dtype=dtype, device=atoms.device)
    for start in range(0, n, _GRAM_BLOCK_ROWS):
        stop = min(start + _GRAM_BLOCK_ROWS, n)
        block = (atoms[start:stop] @ atoms[start:].T).to(dtype)  # [rows, n - start]
        gram[start:stop, start:] = block
        gram[stop:, start:stop] = block[:, stop - start :].T
    return gram


def _auto_batch_size(n_atoms: int, candidates: int, dim: int, steps: int, gram_steps: int, prefiltered: bool,
                     has_gram: bool, device: torch.device) -> int:
    """Targets per batch so that the per-batch buffers (~8 candidate-length rows, the Gram rows of the
    chosen atoms and, for prefilter without G, the gathered candidate atoms) stay near a fixed budget."""
    per_target = 4 * (candidates * (8 + gram_steps) + 3 * steps * dim)
    if prefiltered:  # full-width correlations for the candidate choice, and gathered atoms without G
        per_target += 4 * (3 * n_atoms + (0 if has_gram else candidates * dim))
    budget = BATCH_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // per_target)


class _Workspace:
    """Per-call buffers reused by every batch: on CPU a fresh multi-hundred-MB tensor per batch would cost
    page faults on every touch, on GPU allocator churn."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous buffer of `shape` (uninitialised), carved from the largest one seen under `name`."""
        numel = 1
        for size in shape:
            numel *= size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def _pursue(x: Tensor, atoms: Tensor, valid: Tensor, gram: Tensor | None, steps: int, n_candidates: int,
            prefiltered: bool, refresh: bool, gram_steps: int, work: _Workspace,
            screen: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy support selection for one batch. Returns (atom indices [B, k], kept mask [B, k], the
    working-precision least-squares coefficients of the unit-norm atoms [B, k]). `screen` (prefilter, no
    Gram, no refresh) scores [B, N] from which the candidates are chosen instead of the exact c0."""
    batch, dim = x.shape
    dtype, device = x.dtype, x.device
    eps = torch.finfo(dtype).eps
    stop_rtol, dependent_tol = 100 * eps, 100 * eps  # ~1e-5 in float32, ~2e-14 in float64
    rows = torch.arange(batch, device=device)
    x_norm = x.norm(dim=1)

    # [B, N]: the exact first correlations (the one full GEMM), or the screen's approximation of them
    first_scores = x @ atoms.T if screen is None else screen(x)
    chosen = torch.zeros(batch, steps, dtype=torch.long, device=device)
    kept = torch.zeros(batch, steps, dtype=torch.bool, device=device)
    chosen_atoms = torch.zeros(batch, steps, dim, dtype=dtype, device=device)
    chol = torch.eye(steps, dtype=dtype, device=device).expand(batch, -1, -1).clone()  # L·Lᵀ = G[S, S]
    forward = torch.zeros(batch, steps, dtype=dtype, device=device)  # z with L·z = c0[S]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    gamma = forward[:, :0, None]
    width = n_candidates if prefiltered else atoms.shape[0]
    alpha_buf = work.get("alpha", (batch, width), dtype, device)
    # G[S, candidates], per target contiguous [steps, width]: the update below is one strided batched GEMM
    gram_rows = work.get("gram_rows", (batch, gram_steps, width), dtype, device)
    cand = cand_atoms = None
    c0, alpha = first_scores, first_scores
    blocked = None  # prefilter only: candidates that are zero atoms or already picked (even if skipped)
    picked = torch.zeros(batch, steps, dtype=torch.long, device=device)  # every pick, kept or skipped
    refresh_at = {2**i for i in range(1, steps.bit_length())} if prefiltered and refresh else set()

    for step in range(steps):
        if prefiltered and (step == 0 or step in refresh_at):
            # (Re)choose the candidates: the M atoms most correlated with the current residual.
            if step:  # exact correlations with the current residual: one GEMM
                residual = x - torch.bmm(gamma.mT, chosen_atoms[:, :step])[:, 0]
                alpha = residual @ atoms.T
            full_score = alpha.abs().masked_fill_(~valid, -1.0).scatter_(1, picked[:, :step], -1.0)
            cand = full_score.topk(n_candidates, dim=1, sorted=False).indices  # [B, M]
            blocked = full_score.gather(1, cand) < 0
            if screen is None:  # the screen's scores only chose the candidates: exact c0 comes below
                c0, alpha = first_scores.gather(1, cand), alpha.gather(1, cand)
            if gram is None:  # residual correlations need the candidates' atoms: [B, M, D]
                cand_atoms = work.get("cand_atoms", (batch, n_candidates, dim), dtype, device)
                torch.index_select(atoms, 0, cand.flatten(), out=cand_atoms.view(-1, dim))
                if screen is not None:  # exact c0 on the candidates only
                    c0 = alpha = torch.bmm(cand_atoms, x[:, :, None])[:, :, 0]
            elif step:
                gram_rows[:, :step] = gram[chosen[:, :step, None], cand[:, None, :]]
        if cand is None:
            # Exact pursuit: atoms already picked have (numerically) zero correlation with the residual and
            # zero atoms exactly zero, so zeroing the picks replaces the mask, and max |alpha| comes from one
            # max and one min pass instead of abs + mask + max over [B, N] (the loop is bandwidth-bound).
            if step:
                alpha.scatter_(1, picked[:, :step], 0.0)
            high, high_at = alpha.max(dim=1)
            low, low_at = alpha.min(dim=1)
            upper = high >= -low
            best, pick = torch.where(upper, high, -low), torch.where(upper, high_at, low_at)
        else:
            score = torch.abs(alpha, out=work.get("score", (batch, width), dtype, device))
            score.masked_fill_(blocked, -1.0)
            best, pick = score.max(dim=1)
        done |= best <= stop_rtol * x_norm  # nothing left that any atom can explain
        atom_index = pick if cand is None else cand[rows, pick]
        atom = atoms[atom_index]  # [B, D]
        keep = grow_cholesky(chol, forward, chosen_atoms, atom, c0[rows, pick], step, done, dependent_tol)
        chosen[:, step] = atom_index * keep
        kept[:, step] = keep
        if blocked is not None:
            blocked[rows, pick] = True
        picked[:, step] = atom_index
        if step + 1 == steps:
            break
        size = step + 1
        gamma = torch.linalg.solve_triangular(chol[:, :size, :size].mT, forward[:, :size, None], upper=True)
        if step < gram_steps:  # Batch-OMP update: alpha = c0 - gamma·G[S, candidates]
            gram_rows[:, step] = gram[atom_index] if cand is None else gram[atom_index[:, None], cand]
            alpha = torch.baddbmm(c0[:, None], gamma.mT, gram_rows[:, :size], alpha=-1.0,
                                  out=alpha_buf[:, None])[:, 0]
        else:  # residual update: alpha = (x - gamma·A[S])·A[candidates]ᵀ
            residual = x - torch.bmm(gamma.mT, chosen_atoms[:, :size])[:, 0]
            if cand_atoms is None:
                alpha = residual @ atoms.T
            else:
                alpha = torch.bmm(cand_atoms, residual[:, :, None])[:, :, 0]
    gamma = torch.linalg.solve_triangular(chol.mT, forward[:, :, None], upper=True)[:, :, 0]
    return chosen, kept, gamma


def low_rank_screen(atoms: Tensor, rank: int) -> Callable[[Tensor], Tensor]:
    """x [B, D] -> approximate correlations [B, N] = (x·V)·(A·V)ᵀ, V [D, r] the top-r eigenvectors of AᵀA:
    the projection that keeps most of the unit atoms' energy, at r/D of x·Aᵀ's FLOPs."""
    if rank >= atoms.shape[1]:
        return lambda x: x @ atoms.T
    _, vectors = torch.linalg.eigh((atoms.T @ atoms).double())
    basis = vectors[:, -rank:].to(atoms.dtype).contiguous()  # eigh sorts ascending: the last r
    projected = (atoms @ basis).contiguous()  # [N, r]
    return lambda x: (x @ basis) @ projected.T


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
