"""Our OMP solver vs mergekit's `batch_omp` on the SAME problem: a real pair's donor-space targets and anchors.

    python bench/bench_solver_vs_mergekit.py --pair smollm2-135m:gemma3-270m --k 8 64 --targets 4096

Whole-tool runs (bench_vs_mergekit.py) compare two different problems: mergekit matches tokens by string, so
on SmolLM2 <- Gemma-3 it finds 14,840 anchors where our byte-exact alignment finds 46k, and it approximates more
tokens. This script isolates the solver: the exact targets [B, D] and anchor dictionary [N, D] our `omp` method
builds for the pair, a seeded sample of B targets, mergekit 0.1.5's own `batch_omp` (run in its venv, in its
default batches of 512) against `transplant.solvers.omp.omp` (exact, and prefiltered), same threads, one run.
Time per target is projected to the pair's full target count; our one-off Gram build is timed separately and
added to the projection. Quality: relative reconstruction error ‖t − Σ w·a‖/‖t‖ in the donor space.
"""

from __future__ import annotations

import argparse
import json
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
parts = [batch_omp(data["targets"][i:i + batch], data["dictionary"], k) for i in range(0, len(data["targets"]), batch)]
seconds = time.perf_counter() - started
save_file({"indices": torch.cat([p[0] for p in parts]), "coefs": torch.cat([p[1] for p in parts]).float(),
           "seconds": torch.tensor([seconds])}, sys.argv[3])
"""


def pair_problem(base: str, donor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(all target rows, anchor dictionary) in the donor input space, exactly as the `omp` method builds them."""
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
            print(f"| mergekit batch_omp | {k} | {mk_ms:.2f} | {mk_ms * total / 1000:.0f} | {mk_err:.4f} | 1.0× |",
                  flush=True)
            for name, prefilter in (("ours exact", None), (f"ours prefilter {args.prefilter}", args.prefilter)):
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
