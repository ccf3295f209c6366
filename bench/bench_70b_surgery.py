"""A whole `transplant` run on a synthetic Llama-3-70B-shaped checkpoint: does memory follow the embeddings?

Claim under test (issue 10, item 7): a transplant needs memory for the embedding matrices, not for the model.
The base is written on disk in the real layout: vocab 128,256 x hidden 8,192, untied input and output
embeddings (2 x 2.1 GB in bf16), 64/8 GQA heads, intermediate 28,672, several safetensors shards with a
model.safetensors.index.json, and the real Llama 3 tokenizer; only `--layers` of the 80 layers (~2 GB each) so
that it fits this machine's disk. Embedding rows are random; layer weights are a cheap repeated pattern (their
values never matter to a transplant, they are only copied). Then the CLI runs as a user would run it, in a
fresh process under GNU time (wall seconds, peak RSS), and the output is checked (shapes, index, untouched
layers byte-equal).

    python bench/bench_70b_surgery.py --layers 2 --donor mistral-v3 --method fvt

Prints one table row for bench/RESULTS.md; bench/_work/surgery70b (git-ignored) is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_surgery import llama_config, llama_shapes  # noqa: E402

WORK = ROOT / "bench" / "_work" / "surgery70b"
VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 128_256, 8192, 28_672, 64, 8
SHARD_BYTES = 2 * 2**30


def generate_base(base: Path, layers: int) -> int:
    """Write the sharded base; return the bytes of its two embedding matrices."""
    import torch

    from transplant.assets import load_vocab
    from transplant.io import safetensors

    shapes = llama_shapes(VOCAB, HIDDEN, INTERMEDIATE, layers, HEADS, KV_HEADS)
    gen = torch.Generator().manual_seed(0)

    def maker(name: str, shape: tuple[int, ...]):
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return lambda: torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
        pattern = (torch.randn(shape[-1], generator=gen) * 0.02).to(torch.bfloat16)
        return lambda: pattern.expand(shape).contiguous()

    shards: list[list] = [[]]
    size = 0
    for name, shape in sorted(shapes.items()):
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(safetensors.plan_tensor(name, maker(name, shape), torch.bfloat16, shape))
        size += nbytes
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    safetensors.write_shards(base, shards, {"format": "pt"})
    (base / "config.json").write_text(json.dumps(llama_config(VOCAB, HIDDEN, INTERMEDIATE, layers, HEADS,
                                                              KV_HEADS), indent=2))
    load_vocab("llama3").save(base)
    return 2 * VOCAB * HIDDEN * 2


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) and stdout of a command, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", stats.name, *cmd],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        wall, rss_kb = stats.read().split()[-2:]
    return float(wall), float(rss_kb) / 2**20, proc.stdout


def check(base: Path, out: Path) -> str:
    """Output shards are indexed, embeddings have the new vocabulary, a layer tensor is byte-equal to the
    base's."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    config = json.loads((out / "config.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(out / index[name], "pt") as new, safe_open(base / base_index[name], "pt") as old:
        same_layer = bool((new.get_tensor(name) == old.get_tensor(name)).all())
    rows = {}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        with safe_open(out / index[key], "pt") as handle:
            rows[key] = handle.get_slice(key).get_shape()
    return (f"{len(set(index.values()))} shards, vocab {config['vocab_size']}, embed "
            f"{rows['model.embed_tokens.weight']}, "
            f"lm_head {rows['lm_head.weight']}, untied {not config.get('tie_word_embeddings')}, layer 0 "
            f"byte-equal {same_layer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="of the real 80 (~2 GB each on disk)")
    parser.add_argument("--donor", default="mistral-v3")
    parser.add_argument("--method", default="fvt")
    parser.add_argument("--keep", action="store_true",
                        help="keep bench/_work/surgery70b (multi-GB) afterwards")
    args = parser.parse_args()
    base, out = WORK / "base", WORK / "out"
    embedding_bytes = generate_base(base, args.layers)
    transplant = str(Path(sys.executable).parent / "transplant")
    try:
        wall, rss_gb, stdout = timed([transplant, "--base", str(base), "--donor", args.donor, "--method",
                                      args.method, "-o", str(out), "--overwrite", "--eval-bytes", "0"])
        print(stdout)
        emb_gb = embedding_bytes / 2**30
        print("| base | donor | method | wall s | peak RSS GB | embeddings GB (in + out, bf16) | RSS / "
              "embeddings | output |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| Llama-3-70B shape, {args.layers} of 80 layers | {args.donor} | {args.method} | {wall:.1f} "
              f"| {rss_gb:.2f} "
              f"| {emb_gb:.2f} | {rss_gb / emb_gb:.2f}x | {check(base, out)} |")
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
