r"""Our OMP solver vs mergekit's `batch_omp` on the SAME problem: a real pair's donor-space targets and
anchors.

    python bench/bench_solver_vs_mergekit.py --pair smollm2-135m:gemma3-270m --k 8 64 --targets 4096
    # on a GPU machine without the model assets: a synthetic problem of the same shape, mergekit's omp.py
    # imported from a folder holding its `mergekit_omp` package (omp.py + rope_helpers.py + an empty
    # __init__.py)
    python bench/bench_solver_vs_mergekit.py --synthetic 46000x640 --total 216000 --device cuda \
        --mergekit-src DIR

Whole-tool runs (bench_vs_mergekit.py) compare two different problems: mergekit matches tokens by string, so
on SmolLM2 <- Gemma-3 it finds 14,840 anchors where our byte-exact alignment finds 46k, and it approximates
more tokens. This script isolates the solver: the exact targets [B, D] and anchor dictionary [N, D] our `omp`
method builds for the pair, a seeded sample of B targets, mergekit 0.1.5's own `batch_omp` (run in its venv,
in its default batches of 512) against `transplant.solvers.omp.omp` (exact, and prefiltered), same threads,
one run. Time per target is projected to the pair's full target count; our one-off Gram build is timed
separately and added to the projection. Quality: relative reconstruction error ‖t − Σ w·a‖/‖t‖ in the donor
space.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_mergekit import mergekit_venv  # noqa: E402

MERGEKIT_RUNNER = """
import sys, time, torch
from safetensors.torch import load_file, save_file
from mergekit.tokensurgeon.omp import batch_omp
torch.set_num_threads(int(sys.argv[4]))
data = load_file(sys.argv[1]); k = int(sys.argv[2]); batch = 512
started = time.perf_counter()
parts = [batch_omp(data["targets"][i:i + batch], data["dictionary"], k)
         for i in range(0, len(data["targets"]), batch)]
seconds = time.perf_counter() - started
save_file({"indices": torch.cat([p[0] for p in parts]), "coefs": torch.cat([p[1] for p in parts]).float(),
           "seconds": torch.tensor([seconds])}, sys.argv[3])
"""


def pair_problem(base: str, donor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(all target rows, anchor dictionary) in the donor input space, exactly as the `omp` method builds
    them."""
    from transplant.assets import load_vocab
    from transplant.assets.sources import resolve_source
    from transplant.init.base import InitContext
    from transplant.init.donor import donor_plan
    from transplant.io.surgery import read_embeddings
    from transplant.tokenizers.align import align

    base_src, donor_src = resolve_source(base, need_model=True), resolve_source(donor, need_model=True)
    base_vocab, new_vocab = load_vocab(base_src.tokenizer_spec), load_vocab(donor_src.tokenizer_spec)
    base_emb, donor_emb = read_embeddings(base_src.model_dir), read_embeddings(donor_src.model_dir)
    ctx = InitContext(base_vocab=base_vocab, new_vocab=new_vocab, alignment=align(base_vocab, new_vocab),
                      base_input=base_emb.input, base_output=base_emb.output, donor_input=donor_emb.input)
    captured: dict[str, torch.Tensor] = {}

    class Captured(Exception):
        pass

    def capture(targets: torch.Tensor, dictionary: torch.Tensor):
        captured.update(targets=targets.clone(), dictionary=dictionary.clone())
        raise Captured

    try:
        donor_plan(ctx, "omp", capture)
    except Captured:
        pass
    return captured["targets"], captured["dictionary"]


def synthetic_problem(shape: str, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, dictionary) of bench_omp_solver's synthetic process: `shape` is "NxD" anchors."""
    from bench_omp_solver import synthetic

    n_anchors, dim = (int(v) for v in shape.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    dictionary = synthetic(n_anchors, dim, gen)
    pick = torch.randint(0, n_anchors, (n_targets, 2), generator=gen)
    weights = torch.rand(n_targets, 2, generator=gen)
    targets = (weights[:, :, None] * dictionary[pick]).sum(1) + 0.6 * synthetic(n_targets, dim, gen)
    return targets, dictionary


def synchronized_seconds(fn, device: torch.device) -> tuple[float, object]:
    """Wall seconds of fn() with the GPU's queue drained on both sides (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def same_support(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows whose chosen atom SETS agree (order ignored)."""
    return float((a.sort(dim=1).values == b.sort(dim=1).values).all(dim=1).float().mean())


def in_process(args: argparse.Namespace, targets: torch.Tensor, dictionary: torch.Tensor, total: int) -> None:
    """mergekit's batch_omp and ours in one process on `args.device` (the GPU path: no venv needed there)."""
    from transplant.solvers.omp import omp, unit_gram

    sys.path.insert(0, args.mergekit_src)
    from mergekit_omp.omp import batch_omp

    device = torch.device(args.device)
    targets, dictionary = targets.to(device), dictionary.to(device)
    gram_seconds, gram = synchronized_seconds(lambda: unit_gram(dictionary, torch.float32), device)
    print(f"problem: {total} targets (timed {targets.shape[0]}), {dictionary.shape[0]} anchors, "
          f"D={dictionary.shape[1]}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}); "
          f"our fp32 Gram built once in {gram_seconds:.2f} s\n")
    print("| solver | k | ms/target | projected full s | median rel. error | same support as fp64 | "
          "speed-up vs mergekit |")
    print("|---|---|---|---|---|---|---|")
    check = targets[: args.check].double()
    for k in args.k:
        def mergekit_run(k=k):
            parts = [batch_omp(targets[i:i + 512], dictionary, k) for i in range(0, targets.shape[0], 512)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        ours = {  # name -> solver call (the Gram one-off is added to the Gram variant's projection only)
            "ours exact Batch-OMP, fp32 Gram": (lambda k=k: omp(targets, dictionary, k, gram=gram,
                                                                screen_dtype=None), True),
            "ours exact, bf16 screening + fp32 certificate": (lambda k=k: omp(targets, dictionary, k,
                                                                          screen_dtype=torch.bfloat16),
                                                              False),
        }
        reference, _ = omp(check, dictionary.double(), k, gram_dtype=None)  # exact fp64, residual GEMMs
        synchronized_seconds(lambda k=k: batch_omp(targets[:512], dictionary, k),
                             device)  # warm-up (kernels, cuBLAS)
        for run, _ in ours.values():
            synchronized_seconds(run, device)
        times: dict[str, list[float]] = {"mergekit": [], **{name: [] for name in ours}}
        results = {}
        for _ in range(args.runs):  # interleaved, medians
            seconds, results["mergekit"] = synchronized_seconds(mergekit_run, device)
            times["mergekit"].append(seconds)
            for name, (run, _) in ours.items():
                seconds, results[name] = synchronized_seconds(run, device)
                times[name].append(seconds)
        n = check.shape[0]
        mk_ms = 1000 * statistics.median(times["mergekit"]) / targets.shape[0]
        mk_full = mk_ms * total / 1000
        for name in times:
            idx, coef = results[name]
            ms = 1000 * statistics.median(times[name]) / targets.shape[0]
            full = ms * total / 1000 + (gram_seconds if name in ours and ours[name][1] else 0.0)
            label = "mergekit batch_omp (batches of 512)" if name == "mergekit" else name
            print(f"| {label} | {k} | {ms:.4f} | {full:.1f} | "
                  f"{relative_error(targets.cpu(), dictionary.cpu(), idx.cpu(), coef.cpu()):.4f} | "
                  f"{same_support(idx[:n].cpu(), reference.cpu()):.0%} | {mk_full / full:.1f}x |", flush=True)


def relative_error(targets: torch.Tensor, dictionary: torch.Tensor, indices: torch.Tensor,
                   coefs: torch.Tensor) -> float:
    approx = torch.einsum("bk,bkd->bd", coefs.double(), dictionary.double()[indices])
    return float(((targets.double() - approx).norm(dim=1) / targets.double().norm(dim=1)).median())


def main() -> None:
    from transplant.solvers.omp import omp, unit_gram

    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", default="smollm2-135m:gemma3-270m", help="base:donor with donor weights")
    parser.add_argument("--k", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--targets", type=int, default=4096, help="sampled targets (seeded)")
    parser.add_argument("--prefilter", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic", help="NxD: a synthetic problem instead of --pair (no assets needed)")
    parser.add_argument("--total", type=int, default=216_000,
                        help="full target count to project to (--synthetic)")
    parser.add_argument("--device", default="cpu", help="with --mergekit-src: where both solvers run")
    parser.add_argument("--mergekit-src",
                        help="folder holding a `mergekit_omp` package: run mergekit in-process")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per solver (in-process mode)")
    parser.add_argument("--check", type=int, default=512, help="targets checked against an fp64 exact OMP")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        targets, dictionary = synthetic_problem(args.synthetic, args.targets)
        in_process(args, targets, dictionary, args.total)
        print(json.dumps({"command": " ".join(sys.argv)}))
        return
    base, donor = args.pair.split(":")
    all_targets, dictionary = pair_problem(base, donor)
    total = all_targets.shape[0]
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(0))[: args.targets]
    targets = all_targets[pick].contiguous()
    started = time.perf_counter()
    gram = unit_gram(dictionary, torch.float16 if dictionary.shape[0] > 30000 else torch.float32)
    gram_seconds = time.perf_counter() - started
    print(f"problem: {total} targets (sampled {targets.shape[0]}), {dictionary.shape[0]} anchors, "
          f"D={dictionary.shape[1]}; our Gram ({gram.dtype}) built once in {gram_seconds:.1f} s\n")
    print("| solver | k | ms/target | projected full s | median rel. error | speed-up vs mergekit |")
    print("|---|---|---|---|---|---|")
    python = mergekit_venv().parent / "python"
    with tempfile.TemporaryDirectory() as tmp:
        problem = Path(tmp) / "problem.safetensors"
        save_file({"targets": targets, "dictionary": dictionary.contiguous()}, str(problem))
        runner = Path(tmp) / "runner.py"
        runner.write_text(MERGEKIT_RUNNER)
        for k in args.k:
            result = Path(tmp) / f"mergekit-{k}.safetensors"
            subprocess.run([str(python), str(runner), str(problem), str(k), str(result), str(args.threads)],
                           check=True)
            mk = load_file(str(result))
            mk_ms = 1000 * float(mk["seconds"][0]) / targets.shape[0]
            mk_err = relative_error(targets, dictionary, mk["indices"], mk["coefs"])
            print(f"| mergekit batch_omp | {k} | {mk_ms:.2f} | {mk_ms * total / 1000:.0f} | "
                  f"{mk_err:.4f} | 1.0× |", flush=True)
            for name, prefilter in (("ours exact", None),
                                    (f"ours prefilter {args.prefilter}", args.prefilter)):
                started = time.perf_counter()
                indices, coefs = omp(targets, dictionary, k, prefilter=prefilter, gram=gram)
                ms = 1000 * (time.perf_counter() - started) / targets.shape[0]
                full = ms * total / 1000 + gram_seconds
                err = relative_error(targets, dictionary, indices, coefs)
                print(f"| {name} | {k} | {ms:.2f} | {full:.0f} | {err:.4f} | "
                      f"{mk_ms * total / 1000 / full:.1f}× |", flush=True)
    print(json.dumps({"command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
