"""Throughput of distill.chunks on real tokenizer pairs, 512-token windows (CPU, 1 thread).

    python bench/bench_chunks.py llama3:mistral-v3 smollm2-135m:gemma3-270m
"""
import glob
import statistics
import sys
import sysconfig
import time

import torch

from distill.chunks import align_batch, tokenize_pair
from transplant.assets import load_vocab

torch.set_num_threads(1)

STDLIB = sysconfig.get_paths()["stdlib"]
files = sorted(glob.glob(f"{STDLIB}/json/*.py") + glob.glob(f"{STDLIB}/email/*.py"))
corpus = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
multi = ("Über straße café naïve résumé. 日本語のテキストと中文文本。 "
         "Русский текст и ελληνικά. 🙂👍🏽🧑‍💻 ") * 40
for tname, sname in [(a, b) for a, b in (x.split(":") for x in sys.argv[1:])]:
    t, s = load_vocab(tname), load_vocab(sname)
    for label, text in (("python-src", corpus), ("multilingual", multi * 100)):
        # 512-token windows: cut consecutive slices of ~4 KB text
        texts = [text[i:i + 3000] for i in range(0, 3000 * 64, 3000)]
        start = time.perf_counter()
        pairs = [tokenize_pair(x, t, s, 512) for x in texts]
        tok_s = (time.perf_counter() - start) / len(pairs)
        lengths = (sum(len(p.teacher_ids) for p in pairs) / len(pairs),
                   sum(len(p.student_ids) for p in pairs) / len(pairs))
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            for b in range(0, 64, 8):
                batch = pairs[b:b + 8]
                a = align_batch([p.teacher_ids for p in batch], [p.student_ids for p in batch], t, s)
            runs.append((time.perf_counter() - start) / 64)
        chunks = float(a.chunk_mask.sum(1).float().mean())
        print(f"{tname}->{sname} {label:12s} mean len t/s {lengths[0]:.0f}/{lengths[1]:.0f} "
              f"chunks/seq {chunks:.0f} "
              f"align {1/statistics.median(runs):.0f} seq/s (median of 7, batches of 8)  "
              f"tokenize_pair {1/tok_s:.0f} seq/s")
