"""Does llama.cpp read our output as transformers does? Token ids and greedy generations, side by side.

    pip install llama-cpp-python        # no prebuilt CPU wheel: it builds llama.cpp (~17 min on 2 cores)
    python bench/bench_llama_cpp.py out/smollm2-mistral-v3 [--outtype f32] [--new-tokens 16]

The model folder is exported with `transplant export-gguf` (f32 by default, so the two runtimes compute the
same function up to float order), then for each text of a fixed set (prose, indented code, digits, French,
Japanese, chat markers, runs of spaces, emoji, literal `[INST] <s>`) llama.cpp's token ids are compared with
the output tokenizer's (both without BOS, control tokens parsed), and for each prompt the first
`--new-tokens` greedy tokens of llama.cpp (`top_k=1`, no repeat penalty) with transformers' `generate`. A
table per check is printed; any mismatch exits 1. Without llama-cpp-python the script says how to get it and
exits 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It was the best of times.",
    "code": "def add(a, b):\n    if a:\n\t\treturn a + b\n    return None\n",
    "digits": "In 2026 the price rose from 1,234.56 to 98765 (+7.5%).",
    "french": "L'été dernier, nous sommes allés à Besançon voir la cathédrale.",
    "japanese": "日本語のテキストを正しく分割できますか。",
    "chat markers": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "spaces": "a  b   c    d\n\n\n    e",
    "emoji": "Emoji 🙂👍🏽 and ✨ sparkle",
    "literal specials": "[INST] <s> not a control token here </s> [/INST]",
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def llama_ids(llm, text: str) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
        out.append(int(token))
        if len(out) == n or token == llm.token_eos():
            break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an HF model folder written by transplant / distill")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"])
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: llama-cpp-python is not installed; `pip install llama-cpp-python` (it builds llama.cpp "
              "from source, ~17 min on 2 cores) and rerun", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transplant.io.gguf_export import export_gguf

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = Path(tmp) / "model.gguf"
        export_gguf(args.model, gguf_path, outtype=args.outtype)
        llm = Llama(model_path=str(gguf_path), n_ctx=512, verbose=False, seed=0)
        print("| text | transformers ids | llama.cpp ids | equal |\n|---|---|---|---|")
        for name, text in TEXTS.items():
            ours, theirs = tokenizer.encode(text, add_special_tokens=False), llama_ids(llm, text)
            failures += ours != theirs
            print(f"| {name} | {len(ours)} | {len(theirs)} | {'yes' if ours == theirs else 'NO'} |")
        print(f"\n| prompt | greedy {args.new_tokens} tokens equal | transformers | llama.cpp |")
        print("|---|---|---|---|")
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, add_special_tokens=True)
            with torch.no_grad():
                generated = model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens,
                                           do_sample=False)
            ours = generated[0, len(ids):].tolist()
            theirs = llama_greedy(llm, ids, args.new_tokens)
            failures += ours[:len(theirs)] != theirs
            print(f"| {prompt!r} | {'yes' if ours[:len(theirs)] == theirs else 'NO'} | "
                  f"{tokenizer.decode(ours)!r} | {tokenizer.decode(theirs)!r} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
