"""Tokenizer conversion: build time (no cache), cached load time, peak RSS, and ids vs the reference.

Each alias runs in a fresh process (so RSS is that alias's own). "build" converts the raw file from scratch
(our converter + PreTrainedTokenizerFast wrap + byte view); "cached" is `load_vocab(alias)` once the converted
tokenizer.json is in the cache. Quality: token-id mismatches against the reference implementation on
tests/data/multilingual_sample.txt, its lines and the stdlib's textwrap.py + difflib.py.

    OMP_NUM_THREADS=1 python bench/bench_vocab.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, sysconfig, time
from pathlib import Path
sys.path.insert(0, ROOT)
from transplant.assets.catalog import TOKENIZERS, fetch_tokenizer_file
from transplant.tokenizers.vocab import vocab_from_converted
from transplant.assets import load_vocab
from transplant.tokenizers.load import _convert_file
name, runs = sys.argv[1], int(sys.argv[2])
asset, path = TOKENIZERS[name], fetch_tokenizer_file(name)
load_vocab(name)  # imports and cache warm-up
build, cached = [], []
for _ in range(runs):
    t = time.perf_counter(); vocab_from_converted(_convert_file(asset.format, path, asset.options), name)
    build.append(time.perf_counter() - t)
    t = time.perf_counter(); vocab = load_vocab(name); cached.append(time.perf_counter() - t)
sample = (Path(ROOT) / "tests/data/multilingual_sample.txt").read_text(encoding="utf-8")
stdlib = Path(sysconfig.get_paths()["stdlib"])
texts = [sample, *sample.splitlines()] + [(stdlib / f).read_text() for f in ("textwrap.py", "difflib.py")]
if asset.format == "sentencepiece":
    import sentencepiece as spm
    ref = spm.SentencePieceProcessor(model_file=str(path)).encode
elif asset.format == "tekken":
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    tek = Tekkenizer.from_file(path)
    ref = lambda s: tek.encode(s, bos=False, eos=False)
else:
    import tiktoken, unicodedata
    from transplant.tokenizers.formats import NFC_PATTERNS, PATTERNS, read_tiktoken_ranks
    enc = tiktoken.Encoding(name, pat_str=PATTERNS[asset.options["pattern"]],
                            mergeable_ranks=read_tiktoken_ranks(path), special_tokens={})
    nfc = asset.options["pattern"] in NFC_PATTERNS
    ref = lambda s: enc.encode_ordinary(unicodedata.normalize("NFC", s) if nfc else s)
bad = sum(vocab.encode(t) != ref(t) for t in texts)
tokens = sum(len(ref(t)) for t in texts)
print(json.dumps({"name": name, "size": len(vocab), "build": build, "cached": cached, "texts": len(texts),
                  "mismatch": bad, "tokens": tokens,
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from transplant.assets.catalog import TOKENIZERS

    print("| tokenizer | ids | build (no cache) | cached load | peak RSS | ids vs reference |")
    print("|---|---|---|---|---|---|")
    for name in args.names or list(TOKENIZERS):
        out = subprocess.run(
            [sys.executable, "-c", CHILD.replace("ROOT", repr(str(ROOT))), name, str(args.runs)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {row['size']:,} | {statistics.median(row['build']):.1f} s "
            f"| {statistics.median(row['cached']):.1f} s | {row['rss_gib']:.2f} GiB "
            f"| {row['texts'] - row['mismatch']}/{row['texts']} texts equal ({row['tokens']:,} tokens) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
