"""Side by side with mergekit-tokensurgeon 0.1.5 on the same model pairs, same k, same device (CPU), fairly.

    python bench/bench_vs_mergekit.py --pairs gemma3-270m:smollm2-135m --k 8 64
    python bench/bench_vs_mergekit.py --pairs smollm2-135m:gemma3-270m --k 8 --mergekit-methods omp subword

mergekit is installed from PyPI into its own venv (under the cache dir) the first time. It gets its best
input: the model dirs as the hub ships them, i.e. with the family's tokenizer class in tokenizer_config.json
(`GPT2Tokenizer` for SmolLM2, `GemmaTokenizer` for Gemma-3; mergekit picks its word-start marker from that
class and, given a generic class, matches a third of the shared tokens). Its own view of the problem (tokens
it matches, counted with its own `normalized_vocabulary`) is printed beside ours, and a pair where the two
differ by more than 3% is refused: then the tools would solve different problems.

Every tool runs as a whole command in a fresh process under /usr/bin/time: wall seconds and peak RSS are the
command's own, loading included. Quality is held-out bits/byte of each output model on the fixed slices.
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
# The tokenizer class each reference model's hub checkpoint names in tokenizer_config.json.
HUB_TOKENIZER_CLASS = {"smollm2-135m": "GPT2Tokenizer", "gemma3-270m": "GemmaTokenizer"}
MAX_ANCHOR_GAP = 0.03
MERGEKIT_COUNT = """
import sys, transformers
from mergekit.tokenizer.normalization import normalized_vocabulary
a, b = (normalized_vocabulary(transformers.AutoTokenizer.from_pretrained(p)) for p in sys.argv[1:3])
print(len(set(a) & set(b)), type(transformers.AutoTokenizer.from_pretrained(sys.argv[1])).__name__)
"""


def hub_like_dir(alias: str, model_dir: Path) -> Path:
    """`model_dir` as the hub ships it: every file linked, tokenizer_config.json naming the family's class."""
    cls = HUB_TOKENIZER_CLASS.get(alias)
    if cls is None:
        return model_dir
    out = WORK / f"hub-{alias}"
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        target = out / path.name
        if path.name != "tokenizer_config.json" and not target.exists():
            target.symlink_to(path.resolve())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = cls
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def anchor_counts(base: str, donor: str, base_dir: Path, donor_dir: Path) -> tuple[int, int, str]:
    """(tokens we share by bytes, tokens mergekit matches by its normalised strings, its tokenizer class)."""
    from transplant.assets import load_vocab
    from transplant.tokenizers.align import align

    ours = int(align(load_vocab(base), load_vocab(donor)).shared_mask.sum())
    python = mergekit_venv().parent / "python"
    proc = subprocess.run([str(python), "-c", MERGEKIT_COUNT, str(base_dir), str(donor_dir)],
                          capture_output=True, text=True, check=True)
    count, cls = proc.stdout.split()
    return ours, int(count), cls


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
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", stats.name] + cmd,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        wall, rss_kb = stats.read().split()[-2:]
    return float(wall), float(rss_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", nargs="+", required=True, help="base:donor (model aliases or dirs)")
    parser.add_argument("--k", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--ours", nargs="+", default=["omp", "omp-prefilter"], help="our omp variants per k")
    parser.add_argument("--extra", nargs="+", default=["fvt", "fvt-ls", "sparsemax-knn", "byte-pool"],
                        help="k-independent methods")
    parser.add_argument("--prefilter", type=int, default=1024)
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--mergekit-methods", nargs="+", default=["omp", "subword", "common_interpolation"])
    parser.add_argument("--mergekit-k", nargs="+", type=int, default=None,
                        help="k for mergekit omp (default --k)")
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
        runs: list[tuple[str, str, int | str, list[str]]] = []
        if not args.ours_only:
            hub_base, hub_donor = hub_like_dir(base, base_dir), hub_like_dir(donor, donor_dir)
            ours, theirs, cls = anchor_counts(base, donor, hub_base, hub_donor)
            gap = abs(ours - theirs) / max(ours, 1)
            print(f"<!-- {pair}: shared tokens ours {ours}, mergekit {theirs} ({cls}), "
                  f"gap {gap:.1%} -->", flush=True)
            if gap > MAX_ANCHOR_GAP:
                raise SystemExit(f"{pair}: mergekit matches {theirs} tokens, we match {ours} "
                                 f"({gap:.1%} apart): "
                                 "the tools would solve different problems; fix its input before comparing")
            mergekit = [str(mergekit_venv()), str(hub_base), str(hub_donor), "{out}"]
            for method in args.mergekit_methods:
                for k in (args.mergekit_k or args.k) if method == "omp" else ["—"]:
                    options = ["--k", str(k)] if method == "omp" else []
                    runs.append(("mergekit", method, k,
                                 mergekit + options + ["--approximation-method", method]))
        row(pair, "original", "—", "—", "—", "—", base_dir)
        for k in args.k:
            for variant in args.ours:
                cmd = [transplant_exe, "--base", str(base_dir), "--donor", str(donor_dir), "--method", "omp",
                       "--set", f"k={k}", "-o", "{out}", "--eval-bytes", "0"]
                # our default (`prefilter=auto`) prefilters on CPU for k > 16: name both variants explicitly
                cmd += ["--set", f"prefilter={args.prefilter if variant == 'omp-prefilter' else 0}"]
                runs.append(("ours", variant, k, cmd))
        for method in args.extra:
            runs.append(("ours", method, "—",
                         [transplant_exe, "--base", str(base_dir), "--donor", str(donor_dir),
                                               "--method", method, "-o", "{out}", "--eval-bytes", "0"]))
        for tool, method, k, cmd in runs:
            with tempfile.TemporaryDirectory(dir=WORK) as tmp:
                out = str(Path(tmp) / "model")
                wall, rss = timed([c.replace("{out}", out) for c in cmd])
                row(pair, tool, method, k, f"{wall:.1f}", f"{rss:.0f}", out)
    print(json.dumps({"command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
