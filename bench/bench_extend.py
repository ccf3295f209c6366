"""Vocabulary extension on domain text: sequence-length reduction and held-out bits/byte.

    python bench/bench_extend.py --model smollm2-135m --domain code --n 500 1000 --train-bytes 1000000

Learns n tokens from the domain's TRAINING text (texts.train_text), initialises them (fvt and byte-pool), and
measures on the domain's HELD-OUT slice (never seen when learning): tokens per 1k bytes before/after and BPB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_transplant import WORK  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="code")
    parser.add_argument("--n", nargs="+", type=int, default=[500, 1000])
    parser.add_argument("--methods", nargs="+", default=["fvt", "byte-pool"])
    parser.add_argument("--train-bytes", type=int, default=1_000_000)
    parser.add_argument("--bytes", type=int, default=16384)
    args = parser.parse_args()
    import time

    import transplant
    from transplant.assets import texts
    from transplant.assets.sources import resolve_source
    from transplant.eval.bpb import bits_per_byte, load_for_eval

    WORK.mkdir(exist_ok=True)
    corpus = texts.train_text(args.domain, n_bytes=args.train_bytes)
    held_out = texts.heldout(args.domain, n_bytes=args.bytes)
    n_bytes = len(held_out.encode())
    base_dir = resolve_source(args.model, need_model=True).model_dir
    model, tokenizer = load_for_eval(base_dir)
    base_tokens = len(tokenizer.encode(held_out, add_special_tokens=False))
    print("| model | added | method | learn+init s | tokens / 1k bytes | length change | BPB "
          f"({args.domain} held-out) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.model} | 0 | — | — | {1000 * base_tokens / n_bytes:.1f} | — | "
          f"{bits_per_byte(model, tokenizer, held_out, max_length=512):.4f} |", flush=True)
    for n in args.n:
        for method in args.methods:
            with tempfile.TemporaryDirectory(dir=WORK) as tmp:
                start = time.perf_counter()
                result = transplant.extend_vocab(base_dir, corpus=corpus, n=n, method=method,
                                                 output=Path(tmp) / "m")
                seconds = time.perf_counter() - start
                model, tokenizer = load_for_eval(result.output)
                tokens = len(tokenizer.encode(held_out, add_special_tokens=False))
                assert tokenizer.decode(tokenizer.encode(held_out, add_special_tokens=False)) == held_out
                bpb = bits_per_byte(model, tokenizer, held_out, max_length=512)
            print(f"| {args.model} | {len(result.extra['added_tokens'])} | {method} | {seconds:.1f} | "
                  f"{1000 * tokens / n_bytes:.1f} | "
                  f"{100 * (tokens - base_tokens) / base_tokens:+.1f}% | {bpb:.4f} |", flush=True)


if __name__ == "__main__":
    main()
