r"""Held-out bits/byte of real transplants: every method on every model pair, one table.

    python bench/bench_transplant.py --pairs smollm2-135m:mistral-v3 smollm2-135m:llama3 --methods fvt
    python bench/bench_transplant.py --pairs smollm2-135m:gemma3-270m \
        --methods fvt-ls omp fvt sparsemax-knn knn byte-pool

Prints a markdown table (pair, method, seconds, peak RSS of the transplant, BPB per held-out slice) that goes
into bench/RESULTS.md with the command. Each transplant runs in a fresh subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SLICES = ("english", "code", "german", "numbers")
WORK = Path(__file__).parent / "_work"


def run_one(base: str, donor: str, method: str, options: dict, out: Path) -> dict:
    """Transplant in a fresh process under GNU time: its own wall time and peak RSS (a child's ru_maxrss would
    start from the parent's RSS at fork, which holds a model here)."""
    code = (
        "import json, transplant; "
        f"r = transplant.transplant({base!r}, {donor!r}, method={method!r}, output={str(out)!r}, "
        "overwrite=True, "
        f"options={options!r}); print(json.dumps({{'seconds': r.seconds}}))"
    )
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", stats.name, sys.executable, "-c", code],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        _, rss_kb = stats.read().split()[-2:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**info, "rss_mb": float(rss_kb) / 1024}


def bpb_row(model_dir, texts: dict[str, str]) -> dict[str, float]:
    from transplant.eval.bpb import bits_per_byte, load_for_eval

    model, tokenizer = load_for_eval(model_dir)
    return {name: bits_per_byte(model, tokenizer, text, max_length=512) for name, text in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", nargs="+", required=True, help="base:donor")
    parser.add_argument("--methods", nargs="+", default=["fvt"])
    parser.add_argument("--options", default="{}", help='JSON method options, e.g. {"k": 64}')
    parser.add_argument("--bytes", type=int, default=16384, help="bytes per held-out slice")
    parser.add_argument("--slices", nargs="+", default=list(SLICES))
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    from transplant.assets import texts
    from transplant.assets.sources import resolve_source

    held_out = {name: texts.heldout(name, n_bytes=args.bytes) for name in args.slices}
    options = json.loads(args.options)
    header = "| pair | method | options | transplant s | peak RSS MB | " + " | ".join(args.slices) + " |"
    print(header)
    print("|" + "---|" * (5 + len(args.slices)))
    for pair in args.pairs:
        base, donor = pair.split(":")
        original = bpb_row(resolve_source(base, need_model=True).model_dir, held_out)
        print(f"| {base} (original) | "
              "— | — | — | — | " + " | ".join(f"{original[s]:.4f}" for s in args.slices) + " |", flush=True)
        for method in args.methods:
            with tempfile.TemporaryDirectory(dir=WORK) as tmp:
                out = Path(tmp) / "model"
                info = run_one(base, donor, method, options, out)
                scores = bpb_row(out, held_out)
            print(f"| {base} ← {donor} | {method} | {json.dumps(options) if options else ''} | "
                  f"{info['seconds']:.1f} | "
                  f"{info['rss_mb']:.0f} | " + " | ".join(f"{scores[s]:.4f}" for s in args.slices)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
