r"""Which training-free method should be the default? Every candidate on the same pair, measured in memory.

    python bench/bench_default.py --pair smollm2-135m:gemma3-270m \
        --configs fvt fvt-ls sparsemax-knn "omp:k=8,prefilter=0"
    python bench/bench_default.py --pair gemma3-270m:smollm2-135m --configs fvt fvt-ls --bytes 8192

Loads the two vocabularies, the embedding matrices and the base model once; for each config it runs the same
steps as `transplant()` (`transplant.pipeline.new_embeddings`: the method, then the pipeline's refinements),
swaps the new matrices into the base model in memory and scores held-out bits/byte per slice with the new
tokenizer. Nothing is written, so a config costs its solve plus the evaluation. Prints a markdown table
(config, solve seconds, peak RSS so far, BPB per slice) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

SLICES = ("english", "code", "german", "numbers")


def parse_config(text: str) -> tuple[str, dict]:
    """`omp:k=8,prefilter=0` -> ("omp", {"k": 8, "prefilter": 0}) (checked later by the method's schema)."""
    from transplant.recipes import parse_assignment

    method, _, rest = text.partition(":")
    return method, dict(parse_assignment(item) for item in rest.split(",") if item)


def swap_embeddings(model, new_input: torch.Tensor, new_output: torch.Tensor | None) -> None:
    """Put new matrices into a loaded HF model in place (tied models keep one matrix)."""
    model.resize_token_embeddings(new_input.shape[0], mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_input.to(model.dtype))
        out = model.get_output_embeddings()
        if new_output is not None:
            if out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
                model.config.tie_word_embeddings = False
                out.weight = torch.nn.Parameter(new_output.to(model.dtype).clone())
            else:
                out.weight.copy_(new_output.to(model.dtype))


def load_pair(pair: str):
    """(base source, donor source, base vocab, new vocab, alignment, base embeddings, donor embeddings or
    None) of `base:donor`: what every in-memory candidate bench starts from."""
    from transplant.assets import load_vocab, resolve_source
    from transplant.io.surgery import read_embeddings
    from transplant.tokenizers.align import align

    base_name, donor_name = pair.split(":")
    base_src = resolve_source(base_name, need_model=True)
    donor_src = resolve_source(donor_name, need_model=False)
    base_vocab, new_vocab = load_vocab(base_src.tokenizer_spec), load_vocab(donor_src.tokenizer_spec)
    donor_emb = read_embeddings(donor_src.model_dir) if donor_src.is_model else None
    return (base_src, donor_src, base_vocab, new_vocab, align(base_vocab, new_vocab),
            read_embeddings(base_src.model_dir), donor_emb)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", required=True, help="base:donor")
    parser.add_argument("--configs", nargs="+", required=True, help="method[:key=value,...]")
    parser.add_argument("--bytes", type=int, default=8192, help="bytes per held-out slice")
    parser.add_argument("--slices", nargs="+", default=list(SLICES))
    parser.add_argument("--original", action="store_true", help="also score the base with its own tokenizer")
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from transplant.assets import texts
    from transplant.eval.bpb import bits_per_byte
    from transplant.init.base import InitContext
    from transplant.init.registry import resolve_method
    from transplant.pipeline import new_embeddings

    base_src, _, base_vocab, new_vocab, alignment, base_emb, donor_emb = load_pair(args.pair)
    held_out = {name: texts.heldout(name, n_bytes=args.bytes) for name in args.slices}
    print(f"<!-- {json.dumps({'command': ' '.join(sys.argv)})} -->")
    print("| pair | config | solve s | peak RSS MB | " + " | ".join(args.slices) + " |")
    print("|" + "---|" * (4 + len(args.slices)), flush=True)
    if args.original:
        model = AutoModelForCausalLM.from_pretrained(base_src.model_dir, dtype=torch.float32).eval()
        scores = {n: bits_per_byte(model, base_vocab.tokenizer, t, max_length=512)
                  for n, t in held_out.items()}
        print(f"| {args.pair} | "
              "original | — | — | " + " | ".join(f"{scores[s]:.4f}" for s in args.slices) + " |", flush=True)
    for config in args.configs:
        method, raw = parse_config(config)
        chosen = resolve_method(method, raw)
        ctx = InitContext(base_vocab=base_vocab, new_vocab=new_vocab, alignment=alignment,
                          base_input=base_emb.input, base_output=base_emb.output,
                          donor_input=None if donor_emb is None else donor_emb.input,
                          donor_output=None if donor_emb is None else donor_emb.output,
                          options=dict(chosen.options))
        started = time.perf_counter()
        new_input, new_output, _plan = new_embeddings(ctx, chosen)
        seconds = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(base_src.model_dir, dtype=torch.float32).eval()
        swap_embeddings(model, new_input, new_output)
        scores = {n: bits_per_byte(model, new_vocab.tokenizer, t, max_length=512)
                  for n, t in held_out.items()}
        print(f"| {args.pair} | {config} | {seconds:.1f} | {peak_rss_mb():.0f} | "
              + " | ".join(f"{scores[s]:.4f}" for s in args.slices) + " |", flush=True)
        del model


if __name__ == "__main__":
    main()
