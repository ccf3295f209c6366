"""Number tokens: detect each tokenizer's digit scheme and give new number tokens a dedicated row.

The OMP paper finds that mismatched digit tokenization (single digits vs up-to-3-digit chunks) is what breaks
arithmetic after a transplant. A new token such as `"123"` has no good neighbour in a single-digit model, and
similarity methods mix it with unrelated numbers. The `numbers` step composes it from the base's own
segmentation of the digit string instead: the mean of the pieces' rows, in the input and the output role —
FVT's row for that token, kept in the sparse plan.

Whether that beats a method's own rows is measured per method (bench/RESULTS.md, "Unreachable rows and
fidelity fixes"), and each method declares its default when it registers (`register(..., number_rows=True)`;
absent: off); `--set numbers=true|false` overrides it. It pays for methods that know nothing of a token's
bytes (`mean`), not for byte-pool, and is a no-op for fvt. The output row used to be the FIRST piece's row
("predicting 123 is predicting 1"); that makes every `1xx` token an exact copy of `1`'s output row, so each
digit's probability was split over ~110 tokens, and it measured worse than the mean, so it is gone.
"""

from __future__ import annotations

import re

import torch

from transplant.init.base import InitContext, InitPlan, replace_rows
from transplant.tokenizers.segment import segment_with_base
from transplant.tokenizers.vocab import TokenKind, Vocab

NUMBER = re.compile(rb"^ ?[0-9]+$")


def digit_scheme(vocab: Vocab) -> dict[str, object]:
    """How a tokenizer splits numbers: the longest all-digit token and a readable label."""
    lengths = [len(piece.strip()) for piece, kind in zip(vocab.token_bytes, vocab.kinds)
               if kind is not TokenKind.SPECIAL and NUMBER.match(piece)]
    longest = max(lengths, default=0)
    label = ("no digit tokens" if longest == 0 else "single digits" if longest == 1
             else f"up to {longest} digits")
    return {"max_digits": longest, "label": label}


def digit_report(base: Vocab, new: Vocab) -> dict[str, object]:
    base_scheme, new_scheme = digit_scheme(base), digit_scheme(new)
    return {"digit_split_base": base_scheme["label"], "digit_split_new": new_scheme["label"],
            "digit_mismatch": base_scheme["max_digits"] != new_scheme["max_digits"]}


def number_token_ids(ctx: InitContext) -> list[int]:
    kinds, pieces = ctx.new_vocab.kinds, ctx.new_vocab.token_bytes
    return [i for i in ctx.alignment.unshared_new_ids.tolist() if kinds[i] is not TokenKind.SPECIAL
            and NUMBER.match(pieces[i])]


def compose_number_rows(plan: InitPlan, ctx: InitContext) -> InitPlan:
    """Rewrite the rows of new number tokens as the mean of the base's digit pieces, in every role."""
    ids = number_token_ids(ctx)
    if not ids:
        plan.notes["number_tokens_composed"] = 0
        return plan
    segments = segment_with_base(ctx.base_vocab, [ctx.new_vocab.token_bytes[i] for i in ids])
    pairs = [(i, seg) for i, seg in zip(ids, segments) if seg]
    rows, cols, vals = [], [], []
    for new_id, seg in pairs:
        rows += [new_id] * len(seg)
        cols += seg
        vals += [1.0 / len(seg)] * len(seg)
    changed = [i for i, _ in pairs]
    if plan.output_weights is not None:
        plan.output_weights = replace_rows(plan.output_weights, changed, rows, cols, vals)
    plan.input_weights = replace_rows(plan.input_weights, changed, rows, cols, vals)
    if plan.dense_rows is not None:  # dense overrides must not undo the number rows
        inner = plan.dense_rows
        changed_t = torch.tensor(changed, dtype=torch.long)

        def dense(role: str, base: torch.Tensor):
            row_ids, values = inner(role, base)
            keep = ~torch.isin(row_ids.cpu(), changed_t)
            return row_ids[keep.to(row_ids.device)], values[keep.to(values.device)]

        plan.dense_rows = dense
    plan.notes["number_tokens_composed"] = len(changed)
    return plan
