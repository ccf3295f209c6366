r"""Cheap candidates for OMP (issue 23, item 3): what does choosing candidates first cost in exactness?

    python bench/bench_omp_screen.py --pair smollm2-135m:gemma3-270m --sample 2000 --k 8

Exact OMP's floor is one GEMM of every target against every anchor (bench_omp_floor.py: 162 s of its 452 s on
SmolLM2 ← Gemma-3). A cheaper pursuit first chooses M candidates per target and runs exact OMP inside them,
choosing from either the exact first correlations c0 (the full GEMM, then work of M per step) or a rank-r
projection onto the unit anchors' top-r principal directions (r/D of the GEMM's FLOPs). For a random sample of
the new tokens this prints, per screen: the relative reconstruction error ‖x − A·c‖/‖x‖ in the donor space
(what OMP minimises), its change against exact OMP, the share of exact OMP's atoms the screened pursuit also
picks, and the time per target of the screen (GEMM + top-M) and of the pursuit inside the candidates. The
pursuit here is a plain batched one (residual correlations over the gathered candidates, least squares in
float64), not the solver's; its time is an upper bound for one built into `transplant.solvers.omp`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_omp_floor import first_step_gemm_seconds, omp_problem  # noqa: E402


def relative_error(targets: torch.Tensor, atoms: torch.Tensor, indices: torch.Tensor,
                   coefs: torch.Tensor) -> torch.Tensor:
    """‖x − Σⱼ cⱼ·A[iⱼ]‖ / ‖x‖ per target [B]."""
    rebuilt = (coefs[:, :, None] * atoms[indices]).sum(1)
    return (targets - rebuilt).norm(dim=1) / targets.norm(dim=1).clamp_min(1e-12)


def omp_in_candidates(targets: torch.Tensor, atoms: torch.Tensor, unit: torch.Tensor,
                      candidates: torch.Tensor, k: int,
                      basis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact greedy OMP restricted to each target's candidates [B, M]: (indices [B, k], coefs [B, k] of the
    raw atoms). Picks by |unit atom · residual|, as the solver does; with `basis` [D, r] every correlation is
    taken in that projection instead (r/D of the reading), least squares still in the full space."""
    batch, rows = candidates.shape[0], torch.arange(candidates.shape[0])
    gathered = (unit if basis is None else unit @ basis)[candidates]  # [B, M, D or r]
    residual, chosen = targets.clone(), torch.zeros(batch, k, dtype=torch.long)
    taken = torch.zeros(candidates.shape, dtype=torch.bool)
    coefs = torch.zeros(batch, 0)
    for step in range(k):
        probe = residual if basis is None else residual @ basis
        score = torch.bmm(gathered, probe[:, :, None])[:, :, 0].abs().masked_fill_(taken, -1.0)
        pick = score.argmax(dim=1)
        taken[rows, pick] = True
        chosen[:, step] = candidates[rows, pick]
        support = atoms[chosen[:, : step + 1]]  # [B, s, D]
        solved = torch.linalg.lstsq(support.mT.double(), targets.double()[:, :, None]).solution
        coefs = solved[:, :, 0].float()
        residual = targets - (coefs[:, :, None] * support).sum(1)
    return chosen, coefs


def support_share(screened: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of exact OMP's atoms that the screened pursuit also chose (order ignored)."""
    same = (screened[:, :, None] == exact[:, None, :]).any(dim=2)
    return float(same.float().mean())


def projected_pursuit(targets: torch.Tensor, atoms: torch.Tensor, unit: torch.Tensor, vectors: torch.Tensor,
                      rank: int, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OMP whose candidates and every correlation are taken in the rank-r projection (the candidates'
    [M, r] rows: r/D of the reading of `omp_in_candidates`), least squares in the full space."""
    basis = vectors[:, :rank].float().contiguous()
    candidates = ((targets @ basis) @ (unit @ basis).T).abs_().topk(m, dim=1, sorted=False).indices
    return omp_in_candidates(targets, atoms, unit, candidates, k, basis=basis)


def time_solver(targets: torch.Tensor, atoms: torch.Tensor, k: int, screens: list[tuple[int, int]]) -> None:
    """The solver's own screen (`omp(prefilter=M, screen_rank=r)`) against the first-step GEMM of the same
    targets, one process: the ratio is what the screen saves over exact Batch-OMP (solve = 2.6x its GEMM)."""
    from transplant.solvers.omp import omp

    gemm = first_step_gemm_seconds(targets, atoms, 2000)
    print(f"\n| pursuit | seconds ({targets.shape[0]} targets) | vs the first GEMM | mean relative error |")
    print("|---|---|---|---|")
    print(f"| first-step GEMM only | {gemm:.1f} | 1.00x | - |")
    for rank, m in screens:
        started = time.perf_counter()
        indices, coefs = omp(targets, atoms, k, prefilter=m, screen_rank=rank)
        seconds = time.perf_counter() - started
        error = relative_error(targets, atoms, indices, coefs).mean().item()
        print(f"| rank {rank}, M {m} | {seconds:.1f} | {seconds / gemm:.2f}x | {error:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="smollm2-135m:gemma3-270m", help="base:donor (a donor model)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sample", type=int, default=2000, help="random new tokens to solve")
    parser.add_argument("--candidates", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--projected", action="store_true",
                        help="also the pursuit entirely in the projection (share of targets below 0.6)")
    parser.add_argument("--time-solver", type=int, default=0, metavar="N",
                        help="instead: time the solver's screen (ranks x M) on N targets against the GEMM")
    args = parser.parse_args()
    from transplant.solvers.omp import omp

    torch.manual_seed(0)
    all_targets, atoms = omp_problem(args.pair, args.k)
    if args.time_solver:
        picked = all_targets[torch.randperm(all_targets.shape[0])[: args.time_solver]]
        time_solver(picked, atoms, args.k, [(r, m) for r in args.ranks for m in args.candidates])
        return
    targets = all_targets[torch.randperm(all_targets.shape[0])[: args.sample]]
    unit = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
    exact_indices, exact_coefs = omp(targets, atoms, args.k, prefilter=None, gram_dtype=None)
    exact_error = relative_error(targets, atoms, exact_indices, exact_coefs).mean().item()
    eigenvalues, vectors = torch.linalg.eigh(unit.T @ unit)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)

    projected = {rank: unit @ vectors[:, :rank] for rank in args.ranks}  # [N, r] once per rank, not per batch

    def screen_scores(x: torch.Tensor, rank: int | None) -> torch.Tensor:
        if rank is None:
            return x @ unit.T
        return (x @ vectors[:, :rank]) @ projected[rank].T

    print(f"<!-- {json.dumps({'command': ' '.join(sys.argv), 'threads': torch.get_num_threads()})} -->")
    print(f"{args.pair}: {all_targets.shape[0]} new tokens x {atoms.shape[0]} anchors x "
          f"{atoms.shape[1]} dims, k={args.k}, {args.sample} sampled; exact OMP: mean relative error "
          f"{exact_error:.4f}\n")
    print("| screen | candidates M | energy kept | mean rel. error | vs exact | support share "
          "| screen ms/target | pursuit ms/target |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.candidates:
        for rank in [None, *args.ranks]:
            screen_s = pursuit_s = 0.0
            indices, coefs = [], []
            for start in range(0, targets.shape[0], args.batch):
                x = targets[start : start + args.batch]
                started = time.perf_counter()
                candidates = screen_scores(x, rank).abs_().topk(m, dim=1, sorted=False).indices
                screen_s += time.perf_counter() - started
                started = time.perf_counter()
                chosen, solved = omp_in_candidates(x, atoms, unit, candidates, args.k)
                pursuit_s += time.perf_counter() - started
                indices.append(chosen)
                coefs.append(solved)
            chosen, solved = torch.cat(indices), torch.cat(coefs)
            error = relative_error(targets, atoms, chosen, solved).mean().item()
            energy = 1.0 if rank is None else float(eigenvalues[:rank].sum() / eigenvalues.sum())
            name = "exact c0 (full GEMM)" if rank is None else f"rank {rank}"
            print(f"| {name} | {m} | {energy:.2f} | {error:.4f} | {100 * (error / exact_error - 1):+.1f}% "
                  f"| {support_share(chosen, exact_indices):.2f} | {1e3 * screen_s / len(targets):.3f} "
                  f"| {1e3 * pursuit_s / len(targets):.3f} |")
    if args.projected:
        exact_errors = relative_error(targets, atoms, exact_indices, exact_coefs)
        print(f"\n| pursuit in the projection | M | mean rel. error | vs exact | share below 0.6 (exact "
              f"{float((exact_errors < 0.6).float().mean()):.3f}) |")
        print("|---|---|---|---|---|")
        for m in args.candidates:
            for rank in args.ranks:
                chosen, solved = projected_pursuit(targets, atoms, unit, vectors, rank, m, args.k)
                errors = relative_error(targets, atoms, chosen, solved)
                change = 100 * (errors.mean() / exact_error - 1)
                print(f"| rank {rank} | {m} | {errors.mean():.4f} | {change:+.1f}% "
                      f"| {float((errors < 0.6).float().mean()):.3f} |", flush=True)


if __name__ == "__main__":
    main()
