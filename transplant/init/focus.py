"""`focus`: FOCUS (Dobler & de Melo, 2023), sparsemax over all overlapping tokens in a fastText space.

No donor model is needed, which is the point: the common case is a new tokenizer without a model. FOCUS trains
static embeddings (fastText, see `static_embeddings`) on text tokenized by the NEW tokenizer, so new and
overlapping (shared) tokens live in one space built from how they are used. For each new token, the cosine
similarities to ALL overlapping tokens go through sparsemax (temperature 1, as in the paper's code), and the
weights combine the overlapping tokens' BASE rows: a convex combination that is exactly zero outside the
tokens that are used alike.

Tokens that do not occur often enough in the corpus get fastText's spelling vector (the mean of their trained
character n-gram buckets); tokens with neither keep FVT's row (the mean of their base pieces), where the paper
used random rows. Shared tokens are exact copies, as in every method.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from transplant.init import static_embeddings as static
from transplant.init.base import InitContext, InitPlan, copy_shared
from transplant.init.registry import Option, get_initializer, register
from transplant.solvers.sparsemax import sparsemax
from transplant.tokenizers.vocab import TokenKind

log = logging.getLogger(__name__)

_DEFAULTS = static.FastTextSettings()
OPTIONS = (
    Option("corpus", str, None, "UTF-8 text file in the target language(s) for the auxiliary fastText model "
           "(default: the bundled english+code+german training texts)"),
    Option("max_corpus_bytes", int, 3_000_000, "use at most this many bytes of the corpus", min=1024),
    Option("dim", int, _DEFAULTS.dim, "fastText vector size", min=2, max=1024),
    Option("epochs", int, _DEFAULTS.epochs, "fastText training epochs", min=1, max=100),
    Option("min_count", int, _DEFAULTS.min_count, "a token needs this many occurrences for its own fastText "
           "vector (rarer ones get their spelling vector)", min=1),
    Option("seed", int, _DEFAULTS.seed, "fastText seed"),
    Option("workers", int, _DEFAULTS.workers, "fastText threads (1: the same model for the same seed; more: "
           "faster, not reproducible)", min=1, max=256),
    Option("subword_vectors", bool, True,
           "tokens rarer than min_count get fastText's spelling vector (false: FVT's row)"),
    Option("temperature", float, 1.0, "cosine similarities are divided by this before sparsemax (FOCUS: 1)",
           min=1e-6),
)


def exact_sparsemax(scores: torch.Tensor, start_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsemax over every column of `scores` [B, N], returned as (positions [B, k], weights [B, k]).

    Sorting all N columns per row is the cost of sparsemax; the support is small (median ~40 of ~8k
    overlapping tokens on real tokenizers), so it is solved on the top k and checked: if no column left out
    scores above the threshold τ of that solution, the KKT conditions of the full problem hold and the answer
    is exact. Rows that fail are solved again with 4k columns; the others keep zero-weight padding.
    """
    n = scores.shape[1]
    k = min(start_k, n)
    values, positions = scores.topk(min(k + 1, n), dim=1)
    weights, positions = sparsemax(values[:, :k]), positions[:, :k]
    if k >= n:
        return positions, weights
    tau = values[:, 0] - weights[:, 0]  # the top score is always in the support: w = z − τ
    redo = values[:, k] > tau + 1e-6
    if not bool(redo.any()):
        return positions, weights
    more_positions, more_weights = exact_sparsemax(scores[redo], 4 * k)
    width = more_positions.shape[1]
    positions = torch.nn.functional.pad(positions, (0, width - k))
    weights = torch.nn.functional.pad(weights, (0, width - k))
    positions[redo], weights[redo] = more_positions, more_weights
    return positions, weights


def focus_weights(targets: torch.Tensor, anchors: torch.Tensor, temperature: float,
                  batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor positions, weights) per target: sparsemax(cos(target, every anchor) / T), in row batches so the
    [B, N] similarity block stays small. Results are padded with zero weights to a common width."""
    anchors_n = torch.nn.functional.normalize(anchors.float(), dim=1)
    targets_n = torch.nn.functional.normalize(targets.float(), dim=1)
    out_pos, out_w = [], []
    for start in tqdm(range(0, targets.shape[0], batch_size), desc="focus", leave=False,
                      disable=targets.shape[0] <= 4 * batch_size):
        sims = targets_n[start : start + batch_size] @ anchors_n.T
        pos, w = exact_sparsemax(sims / temperature)
        out_pos.append(pos)
        out_w.append(w)
    width = max((p.shape[1] for p in out_pos), default=0)
    pad = [(torch.nn.functional.pad(p, (0, width - p.shape[1])),
            torch.nn.functional.pad(w, (0, width - w.shape[1])))
           for p, w in zip(out_pos, out_w)]
    if not pad:
        return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat([p for p, _ in pad]), torch.cat([w for _, w in pad])


def _fvt_fallback(ctx: InitContext, replaced: torch.Tensor) -> InitPlan:
    """FVT's plan with the rows of `replaced` (new ids) removed from its matrix and its dense rows."""
    plan = get_initializer("fvt")(replace(ctx, options={}))
    weights = plan.input_weights.coalesce()
    drop = torch.zeros(weights.shape[0], dtype=torch.bool)
    drop[replaced] = True
    keep = ~drop[weights.indices()[0]]
    plan.input_weights = torch.sparse_coo_tensor(weights.indices()[:, keep], weights.values()[keep],
                                                 weights.shape, check_invariants=True).coalesce()
    if plan.dense_rows is not None:
        inner = plan.dense_rows

        def dense_rows(role: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids, rows = inner(role, base)
            mask = ~drop[ids]
            return ids[mask], rows[mask]

        plan.dense_rows = dense_rows
    return plan


# number_rows: digit-piece rows beat FOCUS's own on numbers (bench/RESULTS.md)
@register("focus", needs_donor=False, options=OPTIONS, number_rows=True)
def focus_init(ctx: InitContext) -> InitPlan:
    opts = ctx.options
    text, corpus = static.corpus_text(opts["corpus"], opts["max_corpus_bytes"])
    settings = static.FastTextSettings(dim=opts["dim"], epochs=opts["epochs"], min_count=opts["min_count"],
                                       seed=opts["seed"], workers=opts["workers"])
    model, info = static.load_or_train(ctx.new_vocab, text, settings)
    words = static.token_words(ctx.new_vocab)
    kinds = ctx.new_vocab.kinds
    # one anchor per word: a byte-fallback twin (`<0x2E>` and `.`) would otherwise count its base row twice
    shared, seen = [], set()
    for i in ctx.alignment.shared_new_ids.tolist():
        if kinds[i] is not TokenKind.SPECIAL and words[i] and words[i] not in seen:
            shared.append(i)
            seen.add(words[i])
    new = [i for i in ctx.alignment.unshared_new_ids.tolist() if words[i] is not None]
    shared_vec, shared_src = static.token_vectors(model, [words[i] for i in shared])
    new_vec, new_src = static.token_vectors(model, [words[i] for i in new])
    # FOCUS combines only overlapping tokens that have their own (corpus) vector
    is_anchor = shared_src == static.FROM_CORPUS
    anchor_ids = torch.tensor(shared, dtype=torch.long)[is_anchor]
    covered = new_src == static.FROM_CORPUS if not opts["subword_vectors"] else new_src != static.NO_VECTOR
    target_ids = torch.tensor(new, dtype=torch.long)[covered]
    if anchor_ids.numel() == 0:
        log.warning("focus: no overlapping token occurs in the corpus; every new row is FVT's")
        covered[:] = False
        target_ids = target_ids[:0]
    # FVT's plan keeps the rows FOCUS cannot place; shared copies and FOCUS rows replace the rest
    plan = _fvt_fallback(ctx, torch.cat([ctx.alignment.shared_new_ids, target_ids]))
    shared_rows, shared_cols, _ = copy_shared(ctx.alignment, len(ctx.base_vocab))
    rows, cols = [torch.tensor(shared_rows, dtype=torch.long)], [torch.tensor(shared_cols, dtype=torch.long)]
    vals = [torch.ones(len(shared_rows))]
    support = torch.zeros(0)
    if target_ids.numel():
        log.info("focus: %d new tokens over %d overlapping tokens", target_ids.numel(), anchor_ids.numel())
        pos, w = focus_weights(new_vec[covered], shared_vec[is_anchor], opts["temperature"])
        keep = w.reshape(-1) > 0  # sparsemax zeros (and the padding) are not stored
        rows.append(target_ids.repeat_interleave(pos.shape[1])[keep])
        cols.append(ctx.alignment.new_to_base[anchor_ids][pos.reshape(-1)][keep])
        vals.append(w.reshape(-1)[keep].float())
        support = (w > 0).sum(1).float()
    own = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals),
                                  tuple(plan.input_weights.shape), check_invariants=True)
    plan.input_weights = (own + plan.input_weights).coalesce()  # disjoint rows: a union, nothing is summed
    plan.output_weights = None
    plan.notes = {
        **info, "corpus": corpus, **{k: opts[k] for k in ("dim", "epochs", "min_count", "temperature")},
        "fasttext_vocab": len(model.words),
        "overlapping_used": int(anchor_ids.numel()),
        "overlapping_not_in_corpus": int((~is_anchor).sum()),
        "new_from_corpus": int((covered & (new_src == static.FROM_CORPUS)).sum()),
        "new_from_subwords": int((covered & (new_src == static.FROM_SUBWORDS)).sum()),
        "new_fvt_fallback": len(ctx.alignment.unshared_new_ids) - int(target_ids.numel()),
        "support_median": float(support.median()) if support.numel() else 0.0,
        "support_mean": round(float(support.mean()), 2) if support.numel() else 0.0,
    }
    return plan
