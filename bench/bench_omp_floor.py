r"""Exact OMP against its floor: the whole tool's time, split by phase, beside the first-step GEMM alone.

    python bench/bench_omp_floor.py --pair smollm2-135m:gemma3-270m --k 8

Exact Batch-OMP must compute every target's correlation with every anchor once (c0 = X·Aᵀ: one GEMM of
targets x anchors x dims); nothing exact can skip it, so its time is the floor the issue measures the whole
tool against ("within 1.5x of the first-step GEMM"). This script runs `transplant()` itself (the CLI's path:
resolve, load tokenizers, align, load embeddings, solve, write — `report.json`'s `seconds_by_phase`) into a
temporary folder that is deleted afterwards, then times the GEMM on the same targets and anchors in the
solver's own batches (fp32, unit-normalised anchors, the solver's CPU batch size), and prints both.
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
from bench_default import load_pair, whole_tool_seconds  # noqa: E402


def omp_problem(pair: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, D], atoms [N, D]) in fp32: the donor input rows of the new text tokens and of the anchors,
    the problem `--method omp` solves for the input embeddings of `base:donor`."""
    from transplant.init.base import InitContext
    from transplant.init.donor import select_anchors, text_targets
    from transplant.init.registry import resolve_method

    _, _, base_vocab, new_vocab, alignment, base_emb, donor_emb = load_pair(pair)
    chosen = resolve_method("omp", {"k": k, "prefilter": 0})
    ctx = InitContext(base_vocab=base_vocab, new_vocab=new_vocab, alignment=alignment,
                      base_input=base_emb.input, base_output=None,
                      donor_input=donor_emb.input, donor_output=None, options=dict(chosen.options))
    anchors = select_anchors(ctx, ctx.options["min_norm_ratio"])
    return donor_emb.input[text_targets(ctx)].float(), donor_emb.input[anchors.new_ids].float()


def first_step_gemm_seconds(targets: torch.Tensor, atoms: torch.Tensor, batch: int) -> float:
    """Seconds for c0 = X·Âᵀ over all targets in batches of `batch` (Â: unit-norm atoms), results dropped."""
    unit = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
    started = time.perf_counter()
    for start in range(0, targets.shape[0], batch):
        torch.mm(targets[start:start + batch], unit.T)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="smollm2-135m:gemma3-270m", help="base:donor (a donor model)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=0, help="GEMM batch rows (0: the solver's own)")
    args = parser.parse_args()
    from transplant.solvers.omp import _auto_batch_size

    whole, phases = whole_tool_seconds(args.pair, "omp", {"k": args.k, "prefilter": 0})
    targets, atoms = omp_problem(args.pair, args.k)
    batch = args.batch or _auto_batch_size(atoms.shape[0], atoms.shape[0], atoms.shape[1], args.k, args.k,
                                           False, True, torch.device("cpu"))
    gemm = first_step_gemm_seconds(targets, atoms, batch)
    flops = 2 * targets.shape[0] * atoms.shape[0] * atoms.shape[1]
    print(f"<!-- {json.dumps({'command': ' '.join(sys.argv), 'threads': torch.get_num_threads()})} -->")
    print("| pair | targets x anchors x dims | first-step GEMM s (GFLOP/s) | whole tool s | ratio | "
          + " | ".join(phases) + " |")
    print("|" + "---|" * (5 + len(phases)))
    print(f"| {args.pair} | {targets.shape[0]} x {atoms.shape[0]} x {atoms.shape[1]} | {gemm:.1f} "
          f"({flops / gemm / 1e9:.0f}) | {whole:.1f} | {whole / gemm:.2f}x | "
          + " | ".join(f"{v:.1f}" for v in phases.values()) + " |")


if __name__ == "__main__":
    main()
