"""Side by side with mergekit-tokensurgeon 0.1.5 on the same model pairs, same k, same device (CPU).

    python bench/bench_vs_mergekit.py --pairs gemma3-270m:smollm2-135m --k 8 64
    python bench/bench_vs_mergekit.py --pairs smollm2-135m:gemma3-270m --k 8 --ours-only

mergekit is installed from PyPI into its own venv (under the cache dir) the first time. Every tool runs as a
whole command in a fresh process under /usr/bin/time: wall seconds and peak RSS are the command's own, loading
included. Quality is held-out bits/byte of each output model on the fixed slices (english, code, german, numbers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_transplant import SLICES, WORK, bpb_row  # noqa: E402

MERGEKIT = "mergekit==0.1.5"


def mergekit_venv() -> Path:
    from transplant.assets.wheels import cache_dir

    venv = cache_dir() / "bench" / "mergekit-venv"
    exe = venv / "bin" / "mergekit-tokensurgeon"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # CPU wheel first: no CUDA build pulled in
        subprocess.run(pip + [MERGEKIT], check=True)
    return exe


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", stats.name] + cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        wall, rss_kb = stats.read().split()[-2:]
    return float(wall), float(rss_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", nargs="+", required=True, help="base:donor (model aliases or dirs)")
    parser.add_argument("--k", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--ours", nargs="+", default=["omp", "omp-prefilter"], help="our omp variants per k")
    parser.add_argument("--extra", nargs="+", default=["fvt", "focus", "byte-pool"], help="k-independent methods")
    parser.add_argument("--prefilter", type=int, default=1024)
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--bytes", type=int, default=16384)
    args = parser.parse_args()
    from transplant.assets import texts
    from transplant.assets.sources import resolve_source

    WORK.mkdir(exist_ok=True)
    held_out = {name: texts.heldout(name, n_bytes=args.bytes) for name in SLICES}
    transplant_exe = str(Path(sys.executable).parent / "transplant")
    print("| pair | tool | method | k | wall s | peak RSS MB | " + " | ".join(SLICES) + " |")
    print("|" + "---|" * (6 + len(SLICES)))

    def row(pair, tool, method, k, wall, rss, model_dir):
        scores = bpb_row(model_dir, held_out)
        print(f"| {pair} | {tool} | {method} | {k} | {wall} | {rss} | "
              + " | ".join(f"{scores[s]:.4f}" for s in SLICES) + " |", flush=True)

    for pair in args.pairs:
        base, donor = pair.split(":")
        base_dir = resolve_source(base, need_model=True).model_dir
        donor_dir = resolve_source(donor, need_model=True).model_dir
        row(pair, "original", "—", "—", "—", "—", base_dir)
        runs: list[tuple[str, str, int | str, list[str]]] = []
        for k in args.k:
            if not args.ours_only:
                runs.append(("mergekit", "omp", k, [str(mergekit_venv()), str(base_dir), str(donor_dir), "{out}",
                                                    "--k", str(k), "--approximation-method", "omp"]))
            for variant in args.ours:
                cmd = [transplant_exe, "--base", str(base_dir), "--donor", str(donor_dir), "--method", "omp",
                       "--set", f"k={k}", "-o", "{out}", "--eval-bytes", "0"]
                # our default (`prefilter=auto`) prefilters on CPU for k > 16: name both variants explicitly
                cmd += ["--set", f"prefilter={args.prefilter if variant == 'omp-prefilter' else 0}"]
                runs.append(("ours", variant, k, cmd))
        for method in args.extra:
            runs.append(("ours", method, "—", [transplant_exe, "--base", str(base_dir), "--donor", str(donor_dir),
                                               "--method", method, "-o", "{out}", "--eval-bytes", "0"]))
        for tool, method, k, cmd in runs:
            with tempfile.TemporaryDirectory(dir=WORK) as tmp:
                out = str(Path(tmp) / "model")
                wall, rss = timed([c.replace("{out}", out) for c in cmd])
                row(pair, tool, method, k, f"{wall:.1f}", f"{rss:.0f}", out)
    print(json.dumps({"command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
