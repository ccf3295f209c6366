"""Benchmark: batched OMP solvers on a problem shaped like SmolLM2 <- Gemma-3 (45k anchors, D=640).

Claim under test (docs/design.md §3): exact Batch-OMP is several times cheaper than the plain batched OMP that
recomputes every anchor's correlation with the residual each step, and prefiltering cuts the cost further with
a measurable loss. The real job has ~217k targets; a few hundred to a thousand are timed here and the
per-target cost is extrapolated (the work is linear in the number of targets; the Gram matrix is a one-off).

Data: synthetic embeddings with low-rank structure (rank 64, decaying spectrum), a shared mean direction,
noise and log-normal row norms, which resembles real embedding matrices better than iid Gaussians. A target
(a new token) is a weighted sum of two random anchors plus a fresh row of the same process at 0.6x scale:
related to a few anchors, not in their span.

    OMP_NUM_THREADS=1 python bench/bench_omp_solver.py            # full run, ~10 min on a loaded 2-core box
    OMP_NUM_THREADS=1 python bench/bench_omp_solver.py --anchors 4500 --scale 0.25 --runs 1   # smoke run

One thread: on a shared 2-core machine two OpenMP threads were 4-10x slower than one whenever other jobs ran
(a descheduled thread stalls every barrier), which made timings meaningless.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import threading
import time

import numpy as np
import torch
from sklearn.linear_model import orthogonal_mp
from sklearn.linear_model._omp import _gram_omp  # the core of orthogonal_mp_gram, minus its per-target copy

from transplant.solvers.omp import omp, unit_gram

REAL_TARGETS = 217_000


def synthetic(n: int, dim: int, gen: torch.Generator, rank: int = 64) -> torch.Tensor:
    spectrum = 1.0 / torch.sqrt(1.0 + torch.arange(rank) / 4.0)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=gen)).Q.T  # [rank, dim], orthonormal rows
    mean = torch.randn(dim, generator=gen) / dim**0.5
    rows = (torch.randn(n, rank, generator=gen) * spectrum) @ basis * 3.0
    rows += 0.4 * torch.randn(n, dim, generator=gen) / dim**0.5 * 8 + 1.5 * mean
    return rows * torch.exp(0.3 * torch.randn(n, 1, generator=gen))


# ----------------------------------------------------------------------------- reference algorithms
def naive_omp(targets: torch.Tensor, dictionary: torch.Tensor, k: int, batch_size: int = 64):
    """Plain batched OMP as tools like mergekit do it (written here from the textbook algorithm): every step
    recomputes all correlations with the residual (one [B,D]x[D,N] GEMM) and re-solves least squares from
    scratch on the chosen atoms."""
    norms = dictionary.norm(dim=1).clamp_min(1e-30)
    atoms = dictionary / norms[:, None]
    out_idx, out_coef = [], []
    for start in range(0, targets.shape[0], batch_size):
        x = targets[start : start + batch_size].float()
        residual = x.clone()
        chosen = torch.zeros(x.shape[0], 0, dtype=torch.long)
        for _ in range(k):
            corr = (residual @ atoms.T).abs_()
            corr.scatter_(1, chosen, -1.0)
            chosen = torch.cat([chosen, corr.argmax(dim=1, keepdim=True)], dim=1)
            sub = atoms[chosen]  # [B, s, D]
            coef = torch.linalg.lstsq(sub.mT, x[:, :, None]).solution  # [B, s, 1]
            residual = x - (sub.mT @ coef)[:, :, 0]
        out_idx.append(chosen)
        out_coef.append(coef[:, :, 0] / norms[chosen])
    return torch.cat(out_idx), torch.cat(out_coef)


class SklearnGramOMP:
    """sklearn's Gram OMP (`_gram_omp`, the loop inside `orthogonal_mp_gram`) on our float32 Gram, in place.

    Public `orthogonal_mp_gram` copies the whole Gram per target when given several (8 GB at N=45k, fp32) and
    its `return_path` allocates N×N, so at this size it cannot run here; the private core with
    copy_Gram=False permutes the Gram in place, which this wrapper tracks so every call stays correct. That is
    sklearn's algorithm at its best, without the copy."""

    def __init__(self, gram: torch.Tensor, atoms_unit: np.ndarray, norms: np.ndarray):
        self.gram = gram.numpy().T  # symmetric, so the transpose is the Fortran-ordered view sklearn wants
        self.atoms_unit, self.norms = atoms_unit, norms
        self.original_at = np.arange(len(norms))  # row of the (permuted) Gram -> original atom index

    def __call__(self, targets: torch.Tensor, k: int):
        idx_out = np.zeros((len(targets), k), dtype=np.int64)
        coef_out = np.zeros((len(targets), k), dtype=np.float32)
        for row, x in enumerate(targets.numpy()):
            xy = (self.atoms_unit @ x)[self.original_at]
            gamma, idx, _ = _gram_omp(self.gram, xy, k, copy_Gram=False, copy_Xy=False)
            chosen = self.original_at[idx]
            at, position = np.arange(len(xy)), np.arange(len(xy))  # replay the row/column swaps
            for step, current in enumerate(idx):
                lam = position[current]
                at[step], at[lam] = at[lam], at[step]
                position[at[step]], position[at[lam]] = step, lam
            self.original_at = self.original_at[at]
            idx_out[row, : len(idx)] = chosen
            coef_out[row, : len(idx)] = gamma / self.norms[chosen]
        return torch.from_numpy(idx_out), torch.from_numpy(coef_out)


def sklearn_omp(targets: torch.Tensor, dictionary: torch.Tensor, k: int):
    """sklearn's public `orthogonal_mp` (per-target Cholesky OMP, one X·r GEMV per step, no Gram)."""
    norms = dictionary.double().norm(dim=1)
    atoms = (dictionary.double() / norms[:, None]).numpy()  # float64: in float32 it stops early (dependence)
    coefs = orthogonal_mp(atoms.T, targets.double().numpy().T, n_nonzero_coefs=k, precompute=False)
    coefs = np.asarray(coefs).reshape(len(norms), -1).T  # [B, N]
    idx = np.argsort(-np.abs(coefs), axis=1)[:, :k]
    values = np.take_along_axis(coefs, idx, axis=1) / norms.numpy()[idx]
    return torch.from_numpy(idx), torch.from_numpy(values.astype(np.float32))


# ----------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS polled every 2 ms on CPU (freed
    heap is trimmed first so earlier runs do not hide this one's allocations)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base, self.running = self._rss(), True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def measure(fn, runs: int, device: torch.device):
    """(median seconds, peak bytes, result) over `runs` calls."""
    times, peaks, result = [], [], None
    for _ in range(runs):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak)
        result = tuple(t.cpu() for t in result)
    return statistics.median(times), max(peaks), result


def quality(targets, dictionary, idx, coef):
    recon = (coef[:, :, None].double() * dictionary[idx].double()).sum(dim=1)
    return ((targets.double() - recon).norm(dim=1) / targets.double().norm(dim=1)).numpy()


def same_support(idx_a, coef_a, idx_b, coef_b):
    def sets(idx, coef):
        return [frozenset(i for i, c in zip(r.tolist(), v.tolist(), strict=True) if c)
                for r, v in zip(idx, coef, strict=True)]
    return float(np.mean([a == b for a, b in zip(sets(idx_a, coef_a), sets(idx_b, coef_b), strict=True)]))


def build_gram(dictionary: torch.Tensor, dtype: torch.dtype, device: torch.device):
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        gram = unit_gram(dictionary, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"  Gram {dtype}: {seconds:.1f} s, peak {mem.peak / 2**30:.2f} GiB (1 run)", flush=True)
    return gram, (seconds, mem.peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", type=int, default=45_000)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every timed target count")
    parser.add_argument("--gram-dtype", choices=["float16", "float32"], default="float16",
                        help="Gram storage for the Gram rows (float32 needs 8 GB at 45k anchors)")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching methods")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gram_dtype = getattr(torch, args.gram_dtype)
    gram_name = {"float16": "fp16", "float32": "fp32"}[args.gram_dtype]
    wanted = [part for part in args.only.split(",") if part]
    gen = torch.Generator().manual_seed(0)
    dictionary = synthetic(args.anchors, args.dim, gen)
    pairs = torch.randint(0, args.anchors, (4096, 2), generator=gen)
    weights = 0.3 + 0.7 * torch.rand(4096, 2, 1, generator=gen)
    all_targets = (weights * dictionary[pairs]).sum(dim=1) + 0.6 * synthetic(4096, args.dim, gen)
    atoms = dictionary.to(device)
    print(f"anchors N={args.anchors}, D={args.dim}, device={device}, threads={torch.get_num_threads()}, "
          f"runs={args.runs} (median time, max peak), Gram {gram_name}, "
          f"load average {os.getloadavg()[0]:.1f}")
    # timed targets per method and k: a few seconds per run, ~10 min in all on a loaded 2-core box
    plans = {8: dict(naive=128, exact=512, residual=256, pre=1024, pre_nogram=512, skl=8),
             64: dict(naive=64, exact=64, residual=32, pre=256, pre_nogram=128, skl=4)}
    plans = {k: {name: max(4, int(n * args.scale)) for name, n in plan.items()} for k, plan in plans.items()}
    rows, one_off = [], {}

    def record(label, k, n, uses_gram, fn):
        if wanted and not any(part in label for part in wanted):
            return
        targets = all_targets[:n]
        seconds, peak, (idx, coef) = measure(lambda: fn(targets.to(device)), args.runs, device)
        exact_idx, exact_coef = exact[k]
        rows.append(dict(label=label, k=k, n=n, seconds=seconds, peak=peak, gram=uses_gram,
                         err=quality(targets, dictionary, idx, coef).mean(),
                         exact_err=quality(targets, dictionary, exact_idx[:n], exact_coef[:n]).mean(),
                         agree=same_support(idx, coef, exact_idx[:n], exact_coef[:n])))
        print(f"  {label:<50} k={k:<3} {n:>5} targets {seconds:8.2f} s  peak {peak / 2**20:8.0f} MiB  "
              f"err {rows[-1]['err']:.4f}", flush=True)

    gram, one_off["gram"] = build_gram(atoms, gram_dtype, device)
    # Reference supports: exact OMP with residual correlations (no Gram, so no fp16 near-tie flips).
    exact = {k: tuple(t.cpu() for t in omp(all_targets[: max(plan.values())].to(device), atoms, k,
                                           gram_dtype=None)) for k, plan in plans.items()}
    for k, plan in plans.items():
        record("naive batched OMP (residual GEMM + lstsq)", k, plan["naive"], False,
               lambda t, k=k: naive_omp(t, atoms, k))
        record(f"Batch-OMP exact, {gram_name} Gram", k, plan["exact"], True,
               lambda t, k=k, g=gram: omp(t, atoms, k, gram=g))
        record("Batch-OMP exact, no Gram (residual GEMMs)", k, plan["residual"], False,
               lambda t, k=k: omp(t, atoms, k, gram_dtype=None))
        for refresh in (False, True):
            for m in (256, 1024):
                how = "refreshed" if refresh else "top-M by abs(c0) only"
                name = f"prefilter M={m}, {how}, {gram_name} Gram"
                record(name, k, plan["pre"], True, lambda t, k=k, m=m, r=refresh, g=gram: omp(
                    t, atoms, k, prefilter=m, prefilter_refresh=r, gram=g))
        record("prefilter M=1024, refreshed, no Gram", k, plan["pre_nogram"], False,
               lambda t, k=k: omp(t, atoms, k, prefilter=1024, gram_dtype=None))
        record("sklearn orthogonal_mp (fp64, no Gram)", k, plan["skl"], False,
               lambda t, k=k: sklearn_omp(t.cpu(), dictionary, k))
    if device.type == "cpu" and gram_dtype == torch.float32:  # BLAS needs fp32; sklearn permutes G: last
        norms = dictionary.double().norm(dim=1)
        sk_gram = SklearnGramOMP(gram, (dictionary.double() / norms[:, None]).float().numpy(), norms.numpy())
        for k, plan in plans.items():
            record("sklearn Gram OMP (orthogonal_mp_gram core)", k, plan["skl"], True,
                   lambda t, k=k: sk_gram(t, k))
    print_table(rows, one_off, args)


def print_table(rows, one_off, args) -> None:
    seconds, peak = one_off["gram"]
    print()
    print(f"One-off {args.gram_dtype} Gram of the N={args.anchors} unit anchors (1 run): {seconds:.1f} s, "
          f"peak {peak / 2**30:.2f} GiB; load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print("| method | k | targets timed | time (median of runs) | ms/target | est. 217k targets | peak mem | "
          "rel. err | exact rel. err (same targets) | same support as exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in sorted(rows, key=lambda r: r["k"]):
        per_target = row["seconds"] / row["n"]
        total = per_target * REAL_TARGETS + (seconds if row["gram"] else 0.0)
        print(f"| {row['label']} | {row['k']} | {row['n']} | {row['seconds']:.2f} s | "
              f"{per_target * 1e3:.2f} | "
              f"{total / 60:.0f} min{' incl. Gram' if row['gram'] else ''} | {row['peak'] / 2**20:.0f} MiB | "
              f"{row['err']:.4f} | {row['exact_err']:.4f} | {row['agree'] * 100:.0f}% |")


if __name__ == "__main__":
    main()
