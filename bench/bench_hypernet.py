r"""Held-out bits/byte of a base given unseen tokenizers by hypernet, fvt and other methods (methods that
need a donor model, e.g. `--methods omp`, run only for donors that are models); or, with `--time-steps`, the
speed of hypernetwork training steps on this machine (tokens/s of the LM loss).

    python bench/bench_hypernet.py --hypernet out/hn-short --donors llama3 --bytes 4096
    python bench/bench_hypernet.py --base gemma3-270m --hypernet out/hn-gemma --donors mistral-v3 \
        --methods fvt hypernet
    python bench/bench_hypernet.py --time-steps 5 --base gemma3-270m \
        --recipe recipes/hypernet_smollm2_cpu.yaml

Prints a markdown table (donor, method, transplant seconds, BPB per held-out slice) for the `## Hypernetwork`
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import hypernet.initializer  # noqa: F401
import transplant.init.byte_pool_learned  # noqa: F401  (registers the methods until methods.py imports them)
from transplant.assets import texts
from transplant.assets.sources import resolve_source
from transplant.eval.bpb import model_bits_per_byte
from transplant.init.registry import get_method
from transplant.pipeline import transplant


def time_steps(args: argparse.Namespace) -> None:
    """Median seconds and LM tokens/s of `--time-steps` training steps (after one warm-up step)."""
    from hypernet.config import load_recipe
    from hypernet.train import HypernetTrainer

    with tempfile.TemporaryDirectory() as tmp:
        settings = [f"base={args.base}", f"output_dir={tmp}/hn", "lm_every=1", "max_minutes=null",
                    f"steps={args.time_steps + 1}", *args.set]
        trainer = HypernetTrainer(load_recipe(args.recipe, settings)).setup()
        trainer.engine.train()
        records = [trainer.train_step() for _ in range(args.time_steps + 1)][1:]
    seconds = statistics.median(r["step_seconds"] for r in records)
    print(f"| {args.base} | {trainer.rt.device} | {trainer.rt.dtype} | "
          f"{trainer.recipe.batch_size}x{trainer.recipe.seq_len} "
          f"| {seconds:.3f} | {statistics.median(r['tokens_per_s'] for r in records):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--donors", nargs="+", default=["llama3", "mistral-v3", "qwen", "gemma3-270m"])
    parser.add_argument("--methods", nargs="+", default=["fvt", "hypernet", "byte-pool-learned"],
                        help="methods that need a donor model (omp) run only for donors that are models")
    parser.add_argument("--hypernet")
    parser.add_argument("--slices", nargs="+", default=["english", "code"],
                        help="held-out texts (texts.heldout)")
    parser.add_argument("--bytes", type=int, default=8192)
    parser.add_argument("--pool-steps", type=int, default=1500)
    parser.add_argument("--time-steps", type=int, default=0, help="time N training steps instead")
    parser.add_argument("--recipe", default="recipes/hypernet_smollm2_cpu.yaml")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for --time-steps")
    args = parser.parse_args()
    if args.time_steps:
        time_steps(args)
        return
    if "hypernet" in args.methods and not args.hypernet:
        parser.error("--hypernet DIR is needed for the hypernet method")
    slices = {name: texts.heldout(name, args.bytes) for name in args.slices}
    from transplant.assets.catalog import resolve_model

    base_dir = resolve_model(args.base)
    names = " | ".join(f"{name} BPB" for name in slices)
    print(f"| donor | method | seconds | {names} |\n|---|---|---|" + "---|" * len(slices))
    print("| (base) | - | - | "
          + " | ".join(f"{model_bits_per_byte(base_dir, t):.4f}" for t in slices.values()) + " |",
          flush=True)
    for donor in args.donors:
        donor_is_model = resolve_source(donor, need_model=False).is_model
        for method in args.methods:
            if get_method(method).needs_donor and not donor_is_model:
                continue
            options = {"hypernet": args.hypernet} if method == "hypernet" else {}
            if method == "byte-pool-learned":
                options = {"steps": args.pool_steps}
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                transplant(args.base, donor, method=method, output=Path(tmp) / "m", options=options)
                seconds = time.perf_counter() - started
                bpb = [model_bits_per_byte(Path(tmp) / "m", t) for t in slices.values()]
            print(f"| {donor} | {method} | {seconds:.0f} | " + " | ".join(f"{b:.4f}" for b in bpb)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
