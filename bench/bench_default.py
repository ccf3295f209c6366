r"""Which training-free method should be the default? Every candidate on the same pair, measured in memory.

    python bench/bench_default.py --pair smollm2-135m:gemma3-270m \
        --configs fvt fvt-ls sparsemax-knn "omp:k=8,prefilter=0"
    python bench/bench_default.py --pair gemma3-270m:smollm2-135m --configs fvt fvt-ls --bytes 8192

Loads the two vocabularies, the embedding matrices and the base model once; for each config it runs the same
steps as `transplant()` (`transplant.pipeline.new_embeddings`: the method, then the pipeline's refinements),
swaps the new matrices into the base model in memory and scores held-out bits/byte per slice with the new
tokenizer. Nothing is written, so a config costs its solve plus the evaluation. Prints a markdown table
(config, solve seconds, peak RSS so far, BPB per slice) for bench/RESULTS.md.

`--whole-tool` also runs `transplant()` itself for each config into a temporary folder (deleted after; no
evaluation): the whole tool's seconds as a user meets them, and `report.json`'s split (load tokenizers, align,
load embeddings, solve, write). `--cache DIR` reuses (and fills) bench_token_classes.py's cache of solved
rows, so an expensive candidate (exact OMP) is solved once across benches; its solve time is the cached one.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

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


def whole_tool_seconds(pair: str, method: str, options: dict) -> tuple[float, dict[str, float]]:
    """(seconds, seconds by phase) of `transplant()` for `base:donor` with this method, written to a temporary
    folder that is removed afterwards; nothing is evaluated."""
    import shutil
    import tempfile

    import transplant

    base, donor = pair.split(":")
    work = Path(tempfile.mkdtemp(prefix="bench-default-"))
    try:
        started = time.perf_counter()
        result = transplant.transplant(base, donor, method=method, output=work / "out", options=options)
        return time.perf_counter() - started, result.extra.get("seconds_by_phase", {})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", required=True, help="base:donor")
    parser.add_argument("--configs", nargs="+", required=True, help="method[:key=value,...]")
    parser.add_argument("--bytes", type=int, default=8192, help="bytes per held-out slice")
    parser.add_argument("--slices", nargs="+", default=list(SLICES))
    parser.add_argument("--original", action="store_true", help="also score the base with its own tokenizer")
    parser.add_argument("--whole-tool", nargs="*", default=None, metavar="CONFIG",
                        help="also time transplant() itself for these configs (none named: every config); "
                             "written to a temp folder, removed")
    parser.add_argument("--cache", type=Path, default=None,
                        help="reuse/fill bench_token_classes.py's cache of solved rows (DIR)")
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from transplant.assets import texts
    from transplant.eval.bpb import bits_per_byte
    from transplant.init.base import InitContext
    from transplant.init.registry import resolve_method

    base_src, _, base_vocab, new_vocab, alignment, base_emb, donor_emb = load_pair(args.pair)
    held_out = {name: texts.heldout(name, n_bytes=args.bytes) for name in args.slices}
    print(f"<!-- {json.dumps({'command': ' '.join(sys.argv)})} -->")
    timing_on = args.whole_tool is not None
    timed = " whole tool s | load / align / solve / write s |" if timing_on else ""
    print("| pair | config | solve s |" + timed + " peak RSS MB | " + " | ".join(args.slices) + " |")
    print("|" + "---|" * (4 + 2 * timing_on + len(args.slices)), flush=True)
    if args.original:
        model = AutoModelForCausalLM.from_pretrained(base_src.model_dir, dtype=torch.float32).eval()
        scores = {n: bits_per_byte(model, base_vocab.tokenizer, t, max_length=512)
                  for n, t in held_out.items()}
        print(f"| {args.pair} | original | — |" + " — | — |" * timing_on + " — | "
              + " | ".join(f"{scores[s]:.4f}" for s in args.slices) + " |", flush=True)
    for config in args.configs:
        method, raw = parse_config(config)
        chosen = resolve_method(method, raw)
        ctx = InitContext(base_vocab=base_vocab, new_vocab=new_vocab, alignment=alignment,
                          base_input=base_emb.input, base_output=base_emb.output,
                          donor_input=None if donor_emb is None else donor_emb.input,
                          donor_output=None if donor_emb is None else donor_emb.output,
                          options=dict(chosen.options), base_model_dir=base_src.model_dir)
        new_input, new_output, seconds = solved_rows(args, ctx, chosen, config)
        model = AutoModelForCausalLM.from_pretrained(base_src.model_dir, dtype=torch.float32).eval()
        swap_embeddings(model, new_input, new_output)
        scores = {n: bits_per_byte(model, new_vocab.tokenizer, t, max_length=512)
                  for n, t in held_out.items()}
        timing = " — | — |" if timing_on else ""
        if timing_on and (not args.whole_tool or config in args.whole_tool):
            whole, phases = whole_tool_seconds(args.pair, method, raw)
            split = " / ".join(f"{phases.get(name, 0.0):.0f}" for name in
                               ("load tokenizers", "align", "solve", "write"))
            timing = f" {whole:.1f} | {split} |"
        print(f"| {args.pair} | {config} | {seconds:.1f} |{timing} {peak_rss_mb():.0f} | "
              + " | ".join(f"{scores[s]:.4f}" for s in args.slices) + " |", flush=True)
        del model


def solved_rows(args, ctx, chosen, config: str) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(new input rows, new output rows or None, solve seconds) of one config: from `--cache` when it holds
    them (seconds: the cached solve's), else solved now (and cached when `--cache` is set)."""
    from transplant.pipeline import new_embeddings

    if args.cache is None:
        started = time.perf_counter()
        new_input, new_output, _plan = new_embeddings(ctx, chosen)
        return new_input, new_output, time.perf_counter() - started
    from bench_token_classes import Rows, cache_file, load_cached, save_cached

    path = cache_file(args.cache, args.pair, config)
    rows = load_cached(path, len(ctx.new_vocab))
    if rows is None:
        started = time.perf_counter()
        new_input, new_output, _plan = new_embeddings(ctx, chosen)
        rows = Rows(new_input, new_output, torch.full((len(ctx.new_vocab),), float("nan")),
                    time.perf_counter() - started)
        save_cached(path, rows, config)
    return rows.input, rows.output, rows.seconds


if __name__ == "__main__":
    main()
