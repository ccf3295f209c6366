r"""Which new tokens decide between two methods? Swap one token class's rows at a time (issue 23, item 1).

    python bench/bench_token_classes.py --pair smollm2-135m:gemma3-270m
    python bench/bench_token_classes.py --pair gemma3-270m:smollm2-135m --a fvt-ls --b "omp:k=8,prefilter=0" \
        --slices english code --bytes 2048
    python bench/bench_token_classes.py --pair smollm2-135m:llama3 --a fvt --b byte-pool

For a base:donor pair and two configs A and B, each config's new rows are built once, exactly as
bench/bench_default.py does (`transplant.pipeline.new_embeddings`: the method, then the pipeline's steps), and
cached in a safetensors file per config under --cache, so a rerun skips the solves. Every token of the new
vocabulary gets a class (`transplant.tokenizers.token_class`); for each class the base model scores held-out
bits/byte with A's rows everywhere except the new tokens of that class, which take B's rows. Shared tokens
are exact copies in both (checked and printed), so a class's row isolates what B's rows of that class change.

Per class it also prints each method's donor-space reconstruction error, ‖d − Σ w·d_anchor‖ / ‖d‖ over the
input weights of the method's plan mapped back to donor rows (after the numbers step, before the repairs;
tokens whose support holds a base piece the donor lacks have no value), and the mean cosine between A's and
B's input rows. "slice share" is the share of the slices' tokens (new tokenizer) that are new tokens of the
class; "mean Δ vs A" the mean over slices of the row set's bits/byte minus all-A's. Prints two markdown tables
for bench/RESULTS.md; a class whose rows are the same in A and B is not scored again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default import load_pair, parse_config, peak_rss_mb, swap_embeddings  # noqa: E402

log = logging.getLogger("bench_token_classes")
SLICES = ("english", "code", "german", "numbers", "python-docs")


@dataclass
class Rows:
    """One config's new matrices (output None: tied), per-token donor reconstruction error (NaN: none)."""

    input: torch.Tensor
    output: torch.Tensor | None
    recon: torch.Tensor
    seconds: float
    cached: bool = False


def fail(message: str) -> None:
    print(f"bench_token_classes: {message}", file=sys.stderr)
    sys.exit(2)


def donor_reconstruction(weights: torch.Tensor, new_to_base: torch.Tensor, donor: torch.Tensor,
                         ids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """‖d_t − Σ_j w_tj · d_(new id of base j)‖ / ‖d_t‖ per id in `ids` (NaN where a weight sits on a base
    row the donor vocabulary lacks, or the plan has no weights for the token: a dense row)."""
    shared = torch.nonzero(new_to_base >= 0, as_tuple=True)[0]
    base_to_new = torch.full((weights.shape[1],), -1, dtype=torch.long)
    base_to_new[new_to_base[shared]] = shared
    weights = weights.coalesce()
    rows, cols = weights.indices()
    values = weights.values()
    position = torch.full((weights.shape[0],), -1, dtype=torch.long)
    position[ids] = torch.arange(ids.numel())
    keep = position[rows] >= 0
    rows, cols, values = position[rows[keep]], base_to_new[cols[keep]], values[keep]
    supported = torch.zeros(ids.numel(), dtype=torch.bool)
    supported[rows] = True
    supported[rows[cols < 0]] = False
    errors = torch.full((ids.numel(),), float("nan"))
    for start in range(0, ids.numel(), chunk):
        end = min(start + chunk, ids.numel())
        sel = (rows >= start) & (rows < end) & (cols >= 0)
        targets = donor[ids[start:end]].float()
        approx = torch.zeros_like(targets)
        approx.index_add_(0, rows[sel] - start, values[sel, None] * donor[cols[sel]].float())
        part = (targets - approx).norm(dim=1) / targets.norm(dim=1).clamp_min(1e-12)
        errors[start:end] = torch.where(supported[start:end], part, errors[start:end])
    return errors


def cache_file(cache: Path, pair: str, config: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{pair.replace(':', '--')}--{config}")
    return cache / f"{slug}.safetensors"


def load_cached(path: Path, vocab_size: int) -> Rows | None:
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta, names = f.metadata() or {}, set(f.keys())
        tensors = {name: f.get_tensor(name) for name in names}
    if tensors["input"].shape[0] != vocab_size:
        log.warning("%s has %d rows, the new vocabulary %d: solving again", path, tensors["input"].shape[0],
                    vocab_size)
        return None
    return Rows(tensors["input"], tensors.get("output"), tensors["recon"], float(meta["solve_seconds"]),
                cached=True)


def save_cached(path: Path, rows: Rows, config: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"input": rows.input.contiguous(), "recon": rows.recon.contiguous()}
    if rows.output is not None:
        tensors["output"] = rows.output.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"config": config, "solve_seconds": f"{rows.seconds:.3f}"})
    os.replace(tmp, path)


def context_args(pair: tuple) -> dict:
    """`InitContext` fields (all but the options) from `load_pair`'s tuple, base model dir included (the logit
    prior cap samples from it), so every bench builds its rows as `transplant` does."""
    base_src, _, base_vocab, new_vocab, alignment, base_emb, donor_emb = pair
    return {"base_vocab": base_vocab, "new_vocab": new_vocab, "alignment": alignment,
            "base_input": base_emb.input, "base_output": base_emb.output,
            "donor_input": None if donor_emb is None else donor_emb.input,
            "donor_output": None if donor_emb is None else donor_emb.output,
            "base_model_dir": base_src.model_dir}


def solve(ctx_args: dict, config: str, donor_input: torch.Tensor, new_ids: torch.Tensor) -> Rows:
    """One config's rows through `new_embeddings`, as bench_default.py builds them, plus its reconstruction
    error per new token."""
    from transplant.init.base import InitContext
    from transplant.init.registry import resolve_method
    from transplant.pipeline import new_embeddings

    method, raw = parse_config(config)
    chosen = resolve_method(method, raw)
    ctx = InitContext(**ctx_args, options=dict(chosen.options))
    started = time.perf_counter()
    new_input, new_output, plan = new_embeddings(ctx, chosen)
    seconds = time.perf_counter() - started
    recon = torch.full((new_input.shape[0],), float("nan"))
    if donor_input is not None:  # a tokenizer-only donor has no donor space to reconstruct in
        recon[new_ids] = donor_reconstruction(plan.input_weights, ctx.alignment.new_to_base, donor_input,
                                              new_ids)
    return Rows(new_input, new_output, recon, seconds)


def rows_for(args, pair: str, config: str, ctx_args: dict, donor_input, new_ids, vocab_size: int) -> Rows:
    path = cache_file(args.cache, pair, config)
    rows = None if args.fresh else load_cached(path, vocab_size)
    if rows is None:
        log.info("solving %s on %s", config, pair)
        rows = solve(ctx_args, config, donor_input, new_ids)
        save_cached(path, rows, config)
        log.info("%s: %.1f s solve, cached in %s", config, rows.seconds, path)
    else:
        log.info("%s: rows from %s (solved in %.1f s)", config, path, rows.seconds)
    return rows


def mixed(a: torch.Tensor | None, b: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    if a is None:
        return None
    out = a.clone()
    out[mask] = b[mask]
    return out


def rule_mask(rule: str, class_of: torch.Tensor, recon_a: torch.Tensor,
              recon_b: torch.Tensor) -> torch.Tensor:
    """Where a `--rules` entry takes B's rows: every `key=value` part must hold (classes=a+b, gap=x)."""
    from transplant.tokenizers.token_class import TOKEN_CLASSES

    mask = torch.ones_like(class_of, dtype=torch.bool)
    for part in rule.split(","):
        key, _, value = part.partition("=")
        if key == "classes":
            wanted = [TOKEN_CLASSES.index(c) for c in value.split("+")]
            mask &= torch.isin(class_of, torch.tensor(wanted))
        elif key == "gap":
            mask &= (recon_a - recon_b) > float(value)  # NaN (no value) compares False: A's row kept
        else:
            fail(f"rule part {part!r} is neither classes=A+B nor gap=X")
    return mask


def mean_of(values: torch.Tensor) -> str:
    values = values[~values.isnan()]
    return f"{values.mean():.3f}" if values.numel() else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", required=True,
                        help="base:donor (a tokenizer-only donor: no reconstruction errors, no gap rules)")
    parser.add_argument("--a", default="fvt-ls", help="config A, method[:key=value,...] (default fvt-ls)")
    parser.add_argument("--b", default="omp:k=8,prefilter=0", help="config B (default exact omp k=8)")
    parser.add_argument("--bytes", type=int, default=8192, help="bytes per held-out slice")
    parser.add_argument("--slices", nargs="+", default=list(SLICES))
    parser.add_argument("--classes", nargs="+", help="score only these classes (default: every class)")
    parser.add_argument("--rules", nargs="+", default=[],
                        help="extra row sets, B's rows where the rule holds: "
                             "'classes=space-word+word-piece', "
                             "'gap=0.2' (A's reconstruction error exceeds B's by more than 0.2), joined "
                             "with ',' (all must hold), e.g. 'gap=0.2,classes=space-word'")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for the solved rows (default: <tokentransplant cache>/token_classes)")
    parser.add_argument("--fresh", action="store_true", help="solve again even if cached rows exist")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from transplant.errors import TransplantError
    from transplant.tokenizers.token_class import TOKEN_CLASSES

    if args.pair.count(":") != 1:
        fail(f"--pair {args.pair!r} is not base:donor; pass e.g. --pair gemma3-270m:smollm2-135m")
    unknown = set(args.classes or ()) - set(TOKEN_CLASSES)
    if unknown:
        fail(f"unknown classes {sorted(unknown)}; pick from {', '.join(TOKEN_CLASSES)}")
    try:
        run(args)
    except TransplantError as err:
        fail(str(err))


def run(args) -> None:
    from transformers import AutoModelForCausalLM

    from transplant.assets import texts
    from transplant.cache import cache_dir
    from transplant.eval.bpb import bits_per_byte
    from transplant.tokenizers.token_class import TOKEN_CLASSES, vocab_classes

    torch.manual_seed(0)
    args.cache = args.cache or cache_dir() / "token_classes"
    pair = load_pair(args.pair)
    base_src, _, base_vocab, new_vocab, alignment, base_emb, _ = pair
    ctx_args = context_args(pair)
    donor_input = ctx_args["donor_input"]  # tokenizer-only: no recon errors, no gap
    held_out = {name: texts.heldout(name, n_bytes=args.bytes) for name in args.slices}
    new_ids = alignment.unshared_new_ids
    size = len(new_vocab)
    a = rows_for(args, args.pair, args.a, ctx_args, donor_input, new_ids, size)
    b = rows_for(args, args.pair, args.b, ctx_args, donor_input, new_ids, size)
    if (a.output is None) != (b.output is None):
        fail("one config unties the output and the other does not; compare configs with the same tie")

    shared = alignment.shared_new_ids
    differ = (a.input[shared] != b.input[shared]).any(1)
    if a.output is not None:
        differ |= (a.output[shared] != b.output[shared]).any(1)
    from_base = (a.input[shared] != base_emb.input[alignment.new_to_base[shared]].float()).any(1)
    if differ.any():
        log.warning("%d shared rows differ between A and B; mixes keep A's shared rows", int(differ.sum()))

    class_of = torch.tensor([TOKEN_CLASSES.index(c) for c in vocab_classes(new_vocab)])
    is_new = ~alignment.shared_mask
    class_masks = {c: is_new & (class_of == i) for i, c in enumerate(TOKEN_CLASSES)}
    # per slice: how many of its tokens (new tokenizer) are new tokens of each class
    counts, lengths = {}, {}
    for name, text in held_out.items():
        tokens = torch.tensor(new_vocab.encode(text), dtype=torch.long)
        lengths[name] = tokens.numel()
        counts[name] = torch.bincount(class_of[tokens][is_new[tokens]], minlength=len(TOKEN_CLASSES))

    def share(classes: list[str], names: list[str]) -> float:
        hits = sum(int(counts[n][TOKEN_CLASSES.index(c)]) for n in names for c in classes)
        return hits / max(sum(lengths[n] for n in names), 1)

    model = AutoModelForCausalLM.from_pretrained(base_src.model_dir, dtype=torch.float32).eval()

    def score(inp: torch.Tensor, out: torch.Tensor | None) -> dict[str, float]:
        swap_embeddings(model, inp, out)
        return {n: bits_per_byte(model, new_vocab.tokenizer, t, max_length=512) for n, t in held_out.items()}

    wanted = [c for c in TOKEN_CLASSES if not args.classes or c in args.classes]
    for rule in args.rules:
        class_masks[f"rule {rule}"] = is_new & rule_mask(rule, class_of, a.recon, b.recon)
    results: dict[str, dict[str, float] | None] = {}
    rules = [f"rule {rule}" for rule in args.rules]
    for label in tqdm(["all A", "all B", *wanted, *rules], desc="scoring row sets", unit="set"):
        if label in ("all A", "all B"):
            rows = a if label == "all A" else b
            results[label] = score(rows.input, rows.output)
            continue
        mask = class_masks[label]
        same = torch.equal(a.input[mask], b.input[mask]) and (a.output is None
                                                             or torch.equal(a.output[mask], b.output[mask]))
        results[label] = None if same else score(mixed(a.input, b.input, mask),
                                                 mixed(a.output, b.output, mask))

    summary = {"pair": args.pair, "A": args.a, "B": args.b, "new tokens": int(is_new.sum()),
               "solve s A": round(a.seconds, 1), "solve s B": round(b.seconds, 1), "cached A": a.cached,
               "cached B": b.cached, "slice tokens": sum(lengths.values()),
               "shared rows differing A vs B": int(differ.sum()),
               "shared rows not the base row (repairs)": int(from_base.sum()),
               "peak RSS MB": round(peak_rss_mb())}
    print(f"<!-- {json.dumps({'command': ' '.join(sys.argv)})} -->")
    print(f"<!-- {json.dumps(summary)} -->")
    print_tables(args, results, class_masks, is_new, share, a, b)


def print_tables(args, results, class_masks, is_new, share, a: Rows, b: Rows) -> None:
    """The swap table (one row per class) and the per-slice share table."""
    from transplant.tokenizers.token_class import TOKEN_CLASSES

    slices = list(args.slices)
    cos = torch.nn.functional.cosine_similarity(a.input, b.input, dim=1)
    print("| rows from B | new tokens | slice share | " + " | ".join(slices)
          + " | mean Δ vs A | recon err A | recon err B | cos(A, B) |")
    print("|" + "---|" * (7 + len(slices)))
    reference = results["all A"]
    for label, result in results.items():
        whole = label in ("all A", "all B")
        mask = is_new if whole else class_masks[label]
        scores = reference if result is None else result
        delta = sum(scores[s] - reference[s] for s in slices) / len(slices)
        pooled = share(list(TOKEN_CLASSES) if whole else [label], slices) if label in TOKEN_CLASSES or whole \
            else float("nan")
        name = f"{label} ({args.a if label == 'all A' else args.b})" if whole else label
        name += " (same rows in A and B)" if result is None else ""
        print(f"| {name} | {int(mask.sum())} | {100 * pooled:.1f}% | "
              + " | ".join(f"{scores[s]:.4f}" for s in slices)
              + f" | {delta:+.4f} | {mean_of(a.recon[mask])} | {mean_of(b.recon[mask])} | "
              f"{mean_of(cos[mask])} |", flush=True)
    print()
    print("| class | " + " | ".join(f"{s} share" for s in slices) + " | recon defined A | recon defined B |")
    print("|" + "---|" * (3 + len(slices)))
    for cls in TOKEN_CLASSES:
        mask = class_masks[cls]
        print(f"| {cls} | " + " | ".join(f"{100 * share([cls], [s]):.1f}%" for s in slices)
              + f" | {int((~a.recon[mask].isnan()).sum())} | {int((~b.recon[mask].isnan()).sum())} |")


if __name__ == "__main__":
    main()
