"""`byte-pool`: a new token's row pooled from the base rows of its longest base pieces, with position weights.

Training-free counterpart of byte/word pooling (Byte2Word, "Learn your tokens"). Unlike FVT it does not ask
the base tokenizer (whose merges may split a rare word oddly); it covers the token's bytes greedily with the
longest base pieces — or with single bytes (`--set unit=bytes`) — and weights piece i by

    w_i ∝ len(piece_i) · decay^i

Longer pieces carry more of the token's identity than single bytes, and earlier pieces (the stem, the leading
space that marks a word start) matter more than suffixes; `decay=1` gives a pure length-weighted mean.

`fvt_classes` gives the tokens of some classes FVT's row instead (the base tokenizer's pieces, equal weights).
Swapping one class at a time on SmolLM2 given Llama 3's tokenizer, byte-pool's rows were better than FVT's
for every class but words with a leading space (bench/RESULTS.md, "The default without a donor model"): the
base tokenizer's own split of " word" is the better support there.
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan, copy_shared, mean_rows, normal_base_ids, sparse_rows
from transplant.init.registry import Option, register
from transplant.tokenizers.segment import greedy_segment, segment_with_base
from transplant.tokenizers.token_class import class_set, parse_classes, vocab_classes


def pool_weights(lengths: list[int], decay: float) -> list[float]:
    raw = [length * decay**i for i, length in enumerate(lengths)]
    total = sum(raw)
    return [r / total for r in raw]


OPTIONS = (
    Option("decay", float, 0.8, "weight decay per position (earlier pieces weigh more)", min=0.0, max=1.0),
    Option("unit", str, "pieces", "pool the longest base pieces or single bytes",
           choices=("pieces", "bytes")),
    Option("fvt_classes", str, "space-word",
           "token classes whose rows are FVT's instead ('+'-joined, e.g. space-word; classes: "
           "transplant/tokenizers/token_class.py)", parse=parse_classes),
)


@register("byte-pool", options=OPTIONS)
def byte_pool_init(ctx: InitContext) -> InitPlan:
    decay, unit = ctx.options["decay"], ctx.options["unit"]
    table = ctx.base_vocab.bytes_to_id
    max_len = 1 if unit == "bytes" else max((len(b) for b in table), default=1)
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    unfilled: list[int] = []
    new_ids = ctx.alignment.unshared_new_ids.tolist()
    fvt_pieces: dict[int, list[int]] = {}  # new id -> its base segmentation, for the `fvt_classes` tokens
    if fvt_for := class_set(ctx.options["fvt_classes"]):
        classes = vocab_classes(ctx.new_vocab)
        as_fvt = [i for i in new_ids if classes[i] in fvt_for]
        fvt_pieces = dict(zip(as_fvt, segment_with_base(ctx.base_vocab,
                                                        [ctx.new_vocab.token_bytes[i] for i in as_fvt])))
    for new_id in new_ids:
        piece = ctx.new_vocab.token_bytes[new_id]
        if new_id in fvt_pieces:
            ids = fvt_pieces[new_id]
            weights = [1.0 / len(ids)] * len(ids) if ids else []
        else:
            ids = greedy_segment(piece, table, max_len) if piece else []
            weights = pool_weights([len(ctx.base_vocab.token_bytes[i]) for i in ids], decay) if ids else []
        if not ids:
            unfilled.append(new_id)
            continue
        rows += [new_id] * len(ids)
        cols += ids
        vals += weights
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    dense = (mean_rows(torch.tensor(unfilled, dtype=torch.long), normal_base_ids(ctx.base_vocab))
             if unfilled else None)
    return InitPlan(weights, dense_rows=dense,
                    notes={"decay": decay, "unit": unit, "mean_filled": len(unfilled),
                           "fvt_classes": ctx.options["fvt_classes"],
                           "fvt_rows": len(fvt_pieces)})
