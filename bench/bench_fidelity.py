r"""Unreachable rows and fidelity fixes: held-out BPB per slice and where the output mass goes, per variant.

    python bench/bench_fidelity.py --donor gemma3-270m --runs fvt:unreachable=keep,dedup_cosine=1 fvt
    python bench/bench_fidelity.py --donor llama3 --slices numbers english \
        --runs byte-pool byte-pool:numbers=true

Each run is `method[:key=value,...]` (the `--set` options of `transplant`). The base model is loaded once and
each variant's embeddings are swapped into it, so a variant costs its initializer plus the evaluation, not a
1 GB write and reload. The rows come from the steps `transplant()` runs (`pipeline.new_embeddings` = the
initializer, then `init.apply.finish_embeddings`); the initializer runs once per method and method options,
and runs differing only in pipeline options (numbers, untie, unreachable, dedup_*, rescale_norm) share its
plan.
Columns: BPB per held-out slice (`texts.heldout`, max_length 512 as in bench_transplant.py), then on the
`--mass-slice` the mean share of next-token probability on tokens the base never had (`new`) and on tokens the
new tokenizer can never emit (`unreach.`), and the repair counts. Prints a markdown table for
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import replace

import torch

SLICES = ("english", "code", "german", "numbers")


def parse_run(spec: str) -> tuple[str, dict[str, str]]:
    method, _, rest = spec.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(",") if item)
    return method, options


def install(model, new_input: torch.Tensor, new_output: torch.Tensor | None) -> None:
    """Give a loaded causal LM new embedding matrices (tied when `new_output` is None). The modules are kept
    (Gemma's input embedding scales by sqrt(d)); only their weights and sizes change."""
    vocab = new_input.shape[0]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed.weight = torch.nn.Parameter(new_input.float().contiguous())
    embed.num_embeddings = vocab
    head.weight = embed.weight if new_output is None else torch.nn.Parameter(new_output.float().contiguous())
    head.out_features = vocab
    model.config.vocab_size = vocab
    model.config.tie_word_embeddings = new_output is None


@torch.no_grad()
def bpb_and_mass(model, tokenizer, text: str, groups: dict[str, torch.Tensor],
                 max_length: int = 512) -> tuple[float, dict[str, float]]:
    """Bits per byte of `text` (windows as in `transplant.eval.bpb.sum_nll`, one per forward) and the mean
    next-token probability mass on each id group over the same scored positions."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    totals = {name: 0.0 for name in groups}
    nats, count = 0.0, 0
    for i in range(0, len(ids), max_length - 1):
        seq = torch.tensor([[start, *ids[i : i + max_length - 1]]])
        logprobs = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), dim=-1)
        nats -= float(logprobs.gather(1, seq[0, 1:, None]).sum())
        probs = logprobs.exp()
        for name, group in groups.items():
            totals[name] += float(probs[:, group].sum())
        count += seq.shape[1] - 1
    return nats / math.log(2) / len(text.encode()), {name: total / max(count, 1)
                                                     for name, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--donor", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="method[:key=value,...]")
    parser.add_argument("--bytes", type=int, default=16384)
    parser.add_argument("--slices", nargs="+", default=list(SLICES))
    parser.add_argument("--mass-slice", default="numbers")
    parser.add_argument("--no-original", action="store_true", help="skip the original model's row")
    parser.add_argument("--examples", type=int, default=0, help="print this many repaired rows per run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transplant.assets import load_vocab, texts
    from transplant.assets.sources import resolve_source
    from transplant.eval.bpb import bits_per_byte, load_for_eval
    from transplant.init.apply import finish_embeddings
    from transplant.init.base import InitContext
    from transplant.init.reachable import unreachable_ids
    from transplant.init.registry import PIPELINE_OPTIONS, get_method, resolve_method
    from transplant.io import surgery
    from transplant.tokenizers.align import align

    pipeline_keys = {option.name for option in PIPELINE_OPTIONS}
    held_out = {name: texts.heldout(name, n_bytes=args.bytes) for name in args.slices}
    runs = [parse_run(spec) for spec in args.runs]
    base_src = resolve_source(args.base, need_model=True)
    donor_src = resolve_source(args.donor, need_model=any(get_method(m).needs_donor for m, _ in runs),
                               tokenizer_only_ok=True)
    base_vocab, new_vocab = load_vocab(base_src.tokenizer_spec), load_vocab(donor_src.tokenizer_spec)
    alignment = align(base_vocab, new_vocab)
    base_emb = surgery.read_embeddings(base_src.model_dir)
    donor_emb = surgery.read_embeddings(donor_src.model_dir) if donor_src.is_model else None
    model, base_tokenizer = load_for_eval(base_src.model_dir)
    unreachable = unreachable_ids(new_vocab)
    groups = {"new": alignment.unshared_new_ids, "unreach.": unreachable}

    head = ("| run | s | " + " | ".join(args.slices)
            + f" | new mass ({args.mass_slice}) | unreach. mass | unreachable | near-dup |")
    print(head + "\n|" + "---|" * (head.count("|") - 1), flush=True)
    if not args.no_original:
        scores = [bits_per_byte(model, base_tokenizer, held_out[s], max_length=512) for s in args.slices]
        print(f"| {args.base} "
              "(original) | — | " + " | ".join(f"{x:.4f}" for x in scores) + " | — | — | — | — |", flush=True)
    examples: list[str] = []
    plans: dict[tuple, tuple] = {}  # an initializer runs once per method and method options
    for method, raw in runs:
        chosen = resolve_method(method, raw)
        options = dict(chosen.options)
        own = tuple(sorted((k, str(v)) for k, v in options.items() if k not in pipeline_keys))
        ctx = InitContext(base_vocab=base_vocab, new_vocab=new_vocab, alignment=alignment,
                          base_input=base_emb.input, base_output=base_emb.output,
                          donor_input=None if donor_emb is None else donor_emb.input,
                          donor_output=None if donor_emb is None else donor_emb.output, options=options,
                          base_model_dir=base_src.model_dir)
        started = time.perf_counter()
        if (method, own) not in plans:
            plan = chosen.plan(ctx)
            plans[(method, own)] = (plan, time.perf_counter() - started)
        plan, init_seconds = plans[(method, own)]
        started = time.perf_counter()
        # the pipeline's steps rebind fields, never mutate them
        variant = replace(plan, notes=dict(plan.notes))
        new_input, new_output, variant = finish_embeddings(ctx, variant, chosen)
        seconds = init_seconds + time.perf_counter() - started
        install(model, new_input, new_output)
        tokenizer = new_vocab.tokenizer
        scores, mass = [], {}
        for name in args.slices:
            if name == args.mass_slice:
                bpb, mass = bpb_and_mass(model, tokenizer, held_out[name], groups)
            else:
                bpb = bits_per_byte(model, tokenizer, held_out[name], max_length=512)
            scores.append(bpb)
        if not mass:
            mass = bpb_and_mass(model, tokenizer, held_out[args.mass_slice], groups)[1]
        repairs = variant.notes["repairs"]
        label = method + (" " + ",".join(f"{k}={v}" for k, v in raw.items()) if raw else "")
        print(f"| {label} | {seconds:.0f} | " + " | ".join(f"{x:.4f}" for x in scores)
              + f" | {mass['new']:.1%} | {mass['unreach.']:.1%} | {len(repairs.unreachable)} | "
              f"{len(repairs.duplicates)} |", flush=True)
        show = [f"{new_vocab.token_bytes[d]!r}≈{new_vocab.token_bytes[m]!r} ({c:.3f})"
                for d, m, c in repairs.duplicates[:: max(1,
                                                         len(repairs.duplicates) // max(args.examples, 1))]]
        examples.append(f"{label}: " + ", ".join(show[: args.examples]))
    for line in examples if args.examples else []:
        print(line)


if __name__ == "__main__":
    main()
