"""Digit-scheme detection and the dedicated number-token rows."""

from __future__ import annotations

import torch

from tests.test_align_init import B, N, S, make_vocab
from transplant.init.apply import finish_embeddings
from transplant.init.base import InitContext, InitPlan, build_embedding
from transplant.init.numbers import compose_number_rows, digit_report, digit_scheme
from transplant.init.registry import get_initializer, get_method, parse_options, resolve_method
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


def test_number_rows_are_the_mean_of_digit_pieces_in_both_roles():
    base, new = _vocabs()
    emb, out_emb = torch.randn(len(base), 6), torch.randn(len(base), 6)
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb,
                      base_output=out_emb)
    plan = compose_number_rows(get_initializer("zero")(ctx), ctx)
    assert plan.notes["number_tokens_composed"] == 2
    new_in = build_embedding(plan, "input", emb)
    new_out = build_embedding(plan, "output", out_emb)
    assert torch.allclose(new_in[2], (emb[2] + emb[3] + emb[4]) / 3)  # "123" = mean of 1, 2, 3
    # no longer the first piece's row: that made every "1xx" an exact copy of "1" at the output
    assert torch.allclose(new_out[2], (out_emb[2] + out_emb[3] + out_emb[4]) / 3)
    assert torch.allclose(new_in[3], (emb[11] + emb[5] + emb[6]) / 3)  # " 45" = " ", 4, 5
    assert torch.equal(new_in[1], emb[2])  # shared "1" still copied
    assert torch.count_nonzero(new_in[5]) == 0  # unrelated rows untouched (zero method)
    with_output = InitPlan(get_initializer("zero")(ctx).input_weights, output_weights=plan.input_weights)
    composed = compose_number_rows(with_output, ctx)  # a method's own output plan is rewritten too
    assert torch.allclose(build_embedding(composed, "output", out_emb)[2], new_out[2])


def test_each_method_declares_its_numbers_default():
    assert get_method("mean").number_rows is True  # declared at registration
    assert get_method("fvt").number_rows is False and get_method("byte-pool").number_rows is False
    base, new = _vocabs()
    emb = torch.randn(len(base), 6)
    for method, composed in (("mean", True), ("byte-pool", False)):
        ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb,
                          base_output=None, options=parse_options(method, {}))
        assert ctx.options["numbers"] is None  # unset: the method decides
        chosen = resolve_method(method, {})
        assert chosen.number_rows is composed
        _, _, plan = finish_embeddings(ctx, chosen.plan(ctx), chosen)
        assert plan.notes["number_rows"] is composed
        assert ("number_tokens_composed" in plan.notes) is composed
    chosen = resolve_method("byte-pool", {"numbers": "on"})
    assert finish_embeddings(ctx, chosen.plan(ctx), chosen)[2].notes["number_tokens_composed"] == 2


def test_tied_base_keeps_one_matrix_and_dense_rows_do_not_undo_numbers():
    base, new = _vocabs()
    emb = torch.randn(len(base), 6)
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb,
                      base_output=None)
    plan = compose_number_rows(get_initializer("mean")(ctx), ctx)
    assert plan.output_weights is None
    new_in = build_embedding(plan, "input", emb)
    assert torch.allclose(new_in[2], (emb[2] + emb[3] + emb[4]) / 3)
