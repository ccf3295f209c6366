r"""Where do rebuilt rows put the probability, and does capping their logit prior fix it? (issue 23)

    python bench/bench_logit_prior.py --pair smollm2-135m:gemma3-270m --cache CACHE \
        --a "fvt-ls:pursue_gap=0" --b "fvt-ls:pursue_gap=0.4,pursue_min_cosine=0.6,pursue_prior_cap=false" \
        --slices english code german numbers python-docs quotes spanish portuguese debian-reference

Rows A (the reference) and B (the candidate) come from bench_token_classes.py's cache (solved and cached here
when absent); the "switched" tokens are those whose rows differ. In a tied model every row is an output row,
and μ·row (μ: the mean final hidden state) is the token's logit prior. Prints, for bench/RESULTS.md:

1. per slice, the mean probability the base model puts on the switched tokens with B's rows and with A's (the
   first 512 tokens), and the switched tokens that take the most with B's rows, with the token due there;
2. bits/byte of A, B, and B's switched rows with their prior capped at A's (`transplant.init.logit_prior`,
   μ sampled from the base model as `transplant` does), capped with μ taken from the slices themselves (an
   oracle: how much the sampled μ loses), and set equal to A's (lowered and raised);
3. with `--revert-classes`, B with one token class's switched rows set back to A's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default import load_pair, swap_embeddings  # noqa: E402
from bench_token_classes import context_args, rows_for  # noqa: E402

CONTEXT = 512  # tokens per slice for the probability-mass view


def set_prior(rows: torch.Tensor, reference: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """`rows` with their component along μ replaced by `reference`'s: rows + ((reference − rows)·û) ûᵀ."""
    unit = mu / mu.norm()
    return rows + ((reference - rows) @ unit)[:, None] * unit


@torch.no_grad()
def mass_report(model, tokenizer, text: str, switched: torch.Tensor, token_bytes: list[bytes],
                top: int = 5) -> tuple[float, list[str]]:
    """(mean probability on the `switched` ids over the first CONTEXT tokens, the `top` switched tokens taking
    the most, each with its summed probability and the token due where it takes most)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:CONTEXT])
    probs = model(ids[None]).logits[0].softmax(-1)[:, switched]
    per_token = probs.sum(0)
    lines = []
    for k in per_token.topk(min(top, per_token.numel())).indices.tolist():
        where = int(probs[:, k].argmax())
        due = token_bytes[int(ids[where + 1])] if where + 1 < ids.numel() else b""
        lines.append(f"{token_bytes[int(switched[k])]!r} {per_token[k]:.3f} (due: {due!r})")
    return float(probs.sum(1).mean()), lines


@torch.no_grad()
def slice_mean_hidden(model, tokenizer, texts: dict[str, str]) -> torch.Tensor:
    """The oracle μ: the mean final hidden state over the held-out slices themselves (base rows)."""
    states = [model(torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"][:CONTEXT])[None],
                    output_hidden_states=True).hidden_states[-1][0] for t in texts.values()]
    return torch.cat(states).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", required=True, help="base:donor")
    parser.add_argument("--a", default="fvt-ls:pursue_gap=0", help="reference config (default plain fvt-ls)")
    parser.add_argument("--b", default="fvt-ls:pursue_prior_cap=false",
                        help="candidate config (default: the default gap pursuit, uncapped)")
    parser.add_argument("--slices", nargs="+", default=["english", "code", "german", "numbers"])
    parser.add_argument("--bytes", type=int, default=8192)
    parser.add_argument("--cache", type=Path, default=None, help="bench_token_classes.py's cache of rows")
    parser.add_argument("--revert-classes", nargs="*", default=None, metavar="CLASS",
                        help="also score B with each class's switched rows set back to A's (all: no names)")
    args = parser.parse_args()
    args.fresh = False
    from transformers import AutoModelForCausalLM

    from transplant.assets import texts
    from transplant.cache import cache_dir
    from transplant.eval.bpb import bits_per_byte
    from transplant.init.logit_prior import cap_logit_prior, logit_prior_direction, start_token
    from transplant.tokenizers.token_class import vocab_classes

    args.cache = args.cache or cache_dir() / "token_classes"
    pair = load_pair(args.pair)
    base_src, _, base_vocab, new_vocab, alignment, _, _ = pair
    ctx_args = context_args(pair)
    new_ids, size = alignment.unshared_new_ids, len(new_vocab)
    donor_input = ctx_args["donor_input"]
    a = rows_for(args, args.pair, args.a, ctx_args, donor_input, new_ids, size)
    b = rows_for(args, args.pair, args.b, ctx_args, donor_input, new_ids, size)
    if a.output is not None or b.output is not None:
        sys.exit("bench_logit_prior: untied rows; this bench reads a tied base (one matrix)")
    switched = torch.nonzero((a.input != b.input).any(1), as_tuple=True)[0]
    held_out = {name: texts.heldout(name, n_bytes=args.bytes) for name in args.slices}
    model = AutoModelForCausalLM.from_pretrained(base_src.model_dir, dtype=torch.float32).eval()
    oracle = slice_mean_hidden(model, base_vocab.tokenizer, held_out)
    sampled, why = logit_prior_direction(base_src.model_dir, start_token(base_vocab.roles))
    if sampled is None:
        sys.exit(f"bench_logit_prior: {why}")
    print(f"{len(switched)} switched tokens; cosine(sampled μ, slices' μ) = "
          f"{torch.nn.functional.cosine_similarity(sampled, oracle, dim=0):.3f}\n")

    swap_embeddings(model, b.input, None)
    print("| slice | mass on switched tokens, B | with A's rows | switched tokens taking most with B |")
    print("|---|---|---|---|")
    masses = {name: mass_report(model, new_vocab.tokenizer, text, switched, new_vocab.token_bytes)
              for name, text in held_out.items()}
    swap_embeddings(model, a.input, None)
    for name, text in held_out.items():
        with_a, _ = mass_report(model, new_vocab.tokenizer, text, switched, new_vocab.token_bytes, top=0)
        print(f"| {name} | {masses[name][0]:.4f} | {with_a:.4f} | {'; '.join(masses[name][1])} |", flush=True)

    def variant(mu: torch.Tensor, cap: bool) -> torch.Tensor:
        rows = b.input.clone()
        rows[switched] = (cap_logit_prior(b.input[switched], a.input[switched], mu) if cap
                          else set_prior(b.input[switched], a.input[switched], mu))
        return rows

    variants = {f"A ({args.a})": a.input, f"B ({args.b})": b.input,
                "B, prior capped at A's (sampled μ, as transplant)": variant(sampled, True),
                "B, prior capped at A's (slices' μ, oracle)": variant(oracle, True),
                "B, prior set to A's (sampled μ)": variant(sampled, False)}
    if args.revert_classes is not None:
        classes = vocab_classes(new_vocab)
        names = args.revert_classes or sorted({classes[i] for i in switched.tolist()})
        for cls in names:
            back = torch.tensor([i for i in switched.tolist() if classes[i] == cls], dtype=torch.long)
            rows = b.input.clone()
            rows[back] = a.input[back]
            variants[f"B, {cls} rows back to A's ({back.numel()})"] = rows
    print("\n| rows | " + " | ".join(args.slices) + " |")
    print("|---|" + "---|" * len(args.slices))
    for label, rows in variants.items():
        swap_embeddings(model, rows, None)
        scores = [bits_per_byte(model, new_vocab.tokenizer, held_out[s], max_length=512) for s in args.slices]
        print(f"| {label} | " + " | ".join(f"{x:.4f}" for x in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
