"""Digit-scheme detection and the dedicated number-token rows."""

from __future__ import annotations

import torch

from tests.test_align_init import B, N, S, make_vocab
from transplant.init.base import InitContext, build_embedding
from transplant.init.numbers import compose_number_rows, digit_report, digit_scheme
from transplant.init.registry import get_initializer
from transplant.tokenizers.align import align


def _vocabs():
    base = make_vocab([b""] + [str(d).encode() for d in range(10)] + [b" ", b"x"], [S] + [N] * 12, {"bos": 0})
    new = make_vocab([b"", b"1", b"123", b" 45", b"x", b"\xff"], [S, N, N, N, N, B], {"bos": 0})
    return base, new


def test_digit_scheme_labels():
    base, new = _vocabs()
    assert digit_scheme(base) == {"max_digits": 1, "label": "single digits"}
    assert digit_scheme(new)["label"] == "up to 3 digits"
    assert digit_report(base, new)["digit_mismatch"] is True


def test_number_rows_input_mean_output_first_piece_when_untied():
    base, new = _vocabs()
    emb, out_emb = torch.randn(len(base), 6), torch.randn(len(base), 6)
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb, base_output=out_emb)
    plan = compose_number_rows(get_initializer("zero")(ctx), ctx)
    assert plan.notes["number_tokens_composed"] == 2
    new_in = build_embedding(plan, "input", emb)
    new_out = build_embedding(plan, "output", out_emb)
    assert torch.allclose(new_in[2], (emb[2] + emb[3] + emb[4]) / 3)  # "123" = mean of 1, 2, 3
    assert torch.allclose(new_out[2], out_emb[2])  # predicting "123" ~ predicting "1"
    assert torch.allclose(new_in[3], (emb[11] + emb[5] + emb[6]) / 3)  # " 45" = " ", 4, 5
    assert torch.allclose(new_out[3], out_emb[11])
    assert torch.equal(new_in[1], emb[2])  # shared "1" still copied
    assert torch.count_nonzero(new_in[5]) == 0  # unrelated rows untouched (zero method)


def test_tied_base_keeps_one_matrix_and_dense_rows_do_not_undo_numbers():
    base, new = _vocabs()
    emb = torch.randn(len(base), 6)
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb, base_output=None)
    plan = compose_number_rows(get_initializer("mean")(ctx), ctx)
    assert plan.output_weights is None
    new_in = build_embedding(plan, "input", emb)
    assert torch.allclose(new_in[2], (emb[2] + emb[3] + emb[4]) / 3)
