"""Held-out bits/byte of SmolLM2-135M given unseen tokenizers by hypernet, byte-pool-learned and fvt (methods
that need a donor model, e.g. `--methods omp`, run only for donors that are models).

    python bench/bench_hypernet.py --hypernet out/hn-short --donors llama3 --bytes 4096

Prints a markdown table (donor, method, transplant seconds, BPB on english and code held-out slices) for the
`## Hypernetwork` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import hypernet.initializer  # noqa: F401
import transplant.init.byte_pool_learned  # noqa: F401  (registers the methods until methods.py imports them)
from transplant.assets import texts
from transplant.assets.sources import resolve_source
from transplant.eval.bpb import model_bits_per_byte
from transplant.init.registry import needs_donor
from transplant.pipeline import transplant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--donors", nargs="+", default=["llama3", "mistral-v3", "qwen", "gemma3-270m"])
    parser.add_argument("--methods", nargs="+", default=["fvt", "hypernet", "byte-pool-learned"],
                        help="methods that need a donor model (omp) run only for donors that are models")
    parser.add_argument("--hypernet", required=True)
    parser.add_argument("--bytes", type=int, default=8192)
    parser.add_argument("--pool-steps", type=int, default=1500)
    args = parser.parse_args()
    slices = {name: texts.heldout(name, args.bytes) for name in ("english", "code")}
    from transplant.assets.catalog import resolve_model

    base_dir = resolve_model(args.base)
    print("| donor | method | seconds | english BPB | code BPB |\n|---|---|---|---|---|")
    print("| (base) | - | - | " + " | ".join(f"{model_bits_per_byte(base_dir, t):.4f}" for t in slices.values()) + " |",
          flush=True)
    for donor in args.donors:
        donor_is_model = resolve_source(donor, need_model=False).is_model
        for method in args.methods:
            if needs_donor(method) and not donor_is_model:
                continue
            options = {"hypernet": args.hypernet} if method == "hypernet" else {}
            if method == "byte-pool-learned":
                options = {"steps": args.pool_steps}
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                transplant(args.base, donor, method=method, output=Path(tmp) / "m", options=options)
                seconds = time.perf_counter() - started
                bpb = [model_bits_per_byte(Path(tmp) / "m", t) for t in slices.values()]
            print(f"| {donor} | {method} | {seconds:.0f} | {bpb[0]:.4f} | {bpb[1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
