"""Alignment by bytes/roles and the training-free initializers, on hand-made vocabularies."""

from __future__ import annotations

import pytest
import torch

from transplant.errors import TransplantError
from transplant.init.base import InitContext, build_embedding
from transplant.init.registry import available_methods, get_initializer
from transplant.tokenizers.align import align, shared_token_fraction
from transplant.tokenizers.segment import greedy_segment, segment_with_base
from transplant.tokenizers.vocab import TokenKind, Vocab

N, S, B = TokenKind.NORMAL, TokenKind.SPECIAL, TokenKind.BYTE


class GreedyTokenizer:
    """Stands in for a real tokenizer: greedy longest match (what segment_with_base must verify)."""

    backend_tokenizer = None

    def __init__(self, pieces: list[bytes]):
        self.table = {p: i for i, p in enumerate(pieces) if p}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return greedy_segment(text.encode(), self.table, 16)


def make_vocab(pieces: list[bytes], kinds: list[TokenKind], roles: dict[str, int], specials=None) -> Vocab:
    return Vocab(GreedyTokenizer(pieces), pieces, kinds, roles, special_texts=specials or {})


@pytest.fixture
def vocabs():
    base = make_vocab([b"", b"a", b"b", b"c", b" ", b" cat", b"alog", b"\xc3", b"\xa9"],
                      [S, N, N, N, N, N, N, B, B], {"bos": 0}, {0: "<s>"})
    new = make_vocab([b"", b"", b" cat", b" catalog", b"\xc3\xa9", b"b", b"zz"],
                     [S, S, N, N, N, N, N], {"bos": 0, "eos": 1}, {0: "<bos>", 1: "</s>"})
    return base, new


def test_align_joins_on_bytes_and_roles(vocabs):
    base, new = vocabs
    alignment = align(base, new)
    assert alignment.new_to_base.tolist() == [0, -1, 5, -1, -1, 2, -1]
    assert alignment.matched_by_role == {"bos": (0, 0)}
    stats = alignment.stats(len(base))
    assert stats == {"new_vocab_size": 7, "base_vocab_size": 9, "shared": 3, "new": 4, "dropped": 6}


def test_shared_fraction_counts_new_tokens(vocabs):
    base, new = vocabs
    alignment = align(base, new)
    new.tokenizer.encode = lambda text, add_special_tokens=False: [2, 3, 6, 5]
    assert shared_token_fraction(alignment, new, "x") == pytest.approx(0.5)


def test_segment_prefers_base_tokenizer_and_falls_back_on_invalid_utf8(vocabs):
    base, _ = vocabs
    assert segment_with_base(base, [b" catalog", b"\xc3", b"q"]) == [[5, 6], [7], []]


def _ctx(base, new, dim=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(base), dim, generator=g)
    return InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb,
                       base_output=None, **kw)


@pytest.mark.parametrize("method", ["zero", "mean", "random", "fvt"])
def test_every_method_copies_shared_rows_exactly(vocabs, method):
    base, new = vocabs
    ctx = _ctx(base, new)
    out = build_embedding(get_initializer(method)(ctx), "input", ctx.base_input)
    assert out.shape == (len(new), 4)
    assert torch.isfinite(out).all()
    for new_id, base_id in [(0, 0), (2, 5), (5, 2)]:
        assert torch.equal(out[new_id], ctx.base_input[base_id])


def test_fvt_is_mean_of_base_pieces(vocabs):
    base, new = vocabs
    ctx = _ctx(base, new)
    out = build_embedding(get_initializer("fvt")(ctx), "input", ctx.base_input)
    e = ctx.base_input
    assert torch.allclose(out[3], (e[5] + e[6]) / 2)  # " catalog" = " cat" + "alog"
    assert torch.allclose(out[4], (e[7] + e[8]) / 2)  # "é" from its two byte-fallback tokens
    normal = torch.tensor([i for i, k in enumerate(base.kinds) if k is not S])
    assert torch.allclose(out[1], e[normal].mean(0))  # a new special with no bytes: the mean row
    assert torch.allclose(out[6], e[normal].mean(0))  # "zz": no base piece at all


def test_zero_and_mean(vocabs):
    base, new = vocabs
    ctx = _ctx(base, new)
    zero = build_embedding(get_initializer("zero")(ctx), "input", ctx.base_input)
    assert torch.count_nonzero(zero[[1, 3, 4, 6]]) == 0
    mean = build_embedding(get_initializer("mean")(ctx), "input", ctx.base_input)
    normal = torch.tensor([i for i, k in enumerate(base.kinds) if k is not S])
    assert torch.allclose(mean[3], ctx.base_input[normal].mean(0))


def test_random_matches_base_statistics_and_is_not_collapsed():
    pieces = [bytes([i]) for i in range(256)]
    base = make_vocab(pieces, [N] * 256, {})
    new = make_vocab([b"x" * (i + 2) for i in range(4000)], [N] * 4000, {})
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(256, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb,
                      base_output=None, options={"seed": 7})
    out = build_embedding(get_initializer("random")(ctx), "input", emb)
    assert torch.allclose(out.mean(0), emb.mean(0), atol=0.25)
    assert torch.allclose(torch.cov(out.T), torch.cov(emb.T), atol=0.35 * torch.cov(emb.T).abs().max())
    again = build_embedding(get_initializer("random")(ctx), "input", emb)
    assert torch.equal(out, again)  # seeded


def test_output_weights_apply_to_output_matrix(vocabs):
    base, new = vocabs
    ctx = _ctx(base, new)
    plan = get_initializer("fvt")(ctx)
    out_base = torch.randn(len(base), 4)
    out = build_embedding(plan, "output", out_base)
    assert torch.allclose(out[3], (out_base[5] + out_base[6]) / 2)


def test_unknown_method_and_missing_donor(vocabs):
    base, new = vocabs
    with pytest.raises(TransplantError, match="unknown method"):
        get_initializer("nope")
    assert {"zero", "mean", "random", "fvt"} <= set(available_methods())
    with pytest.raises(TransplantError, match="needs donor embeddings"):
        _ctx(base, new).require_donor("omp")


def test_byte_pool_weights_longest_pieces_by_length_and_position(vocabs):
    base, new = vocabs
    ctx = _ctx(base, new, options={"decay": 0.5, "fvt_classes": "none"})
    out = build_embedding(get_initializer("byte-pool")(ctx), "input", ctx.base_input)
    e = ctx.base_input
    # " catalog" = " cat" (4 bytes, weight 4) + "alog" (4 bytes, weight 4 * 0.5)
    assert torch.allclose(out[3], (4 * e[5] + 2 * e[6]) / 6)
    ctx_bytes = _ctx(base, new, options={"unit": "bytes", "decay": 1.0, "fvt_classes": "none"})
    out_bytes = build_embedding(get_initializer("byte-pool")(ctx_bytes), "input", ctx_bytes.base_input)
    assert torch.allclose(out_bytes[4], (e[7] + e[8]) / 2)


def test_byte_pool_gives_the_fvt_classes_fvts_rows(vocabs):
    """`fvt_classes=space-word`: " catalog" (a word with a leading space) gets FVT's row, every other new
    token keeps byte-pool's."""
    base, new = vocabs
    pooled = build_embedding(get_initializer("byte-pool")(_ctx(base, new, options={"decay": 0.5,
                                                                                  "fvt_classes": "none"})),
                             "input", _ctx(base, new).base_input)
    ctx = _ctx(base, new, options={"decay": 0.5, "fvt_classes": "space-word"})
    plan = get_initializer("byte-pool")(ctx)
    mixed = build_embedding(plan, "input", ctx.base_input)
    fvt = build_embedding(get_initializer("fvt")(_ctx(base, new)), "input", ctx.base_input)
    assert plan.notes["fvt_rows"] == 1
    assert torch.allclose(mixed[3], fvt[3]) and not torch.allclose(mixed[3], pooled[3])
    assert torch.equal(mixed[4], pooled[4]) and torch.equal(mixed[6], pooled[6])


def test_normal_token_wins_over_byte_fallback_duplicate():
    # SentencePiece style: the byte token <0x31> comes first, the trained normal "1" later
    base = make_vocab([b"", b"1", b"1", b" "], [S, B, N, N], {"bos": 0})
    new = make_vocab([b"", b"1"], [S, N], {"bos": 0})
    assert base.bytes_to_id[b"1"] == 2
    assert align(base, new).new_to_base.tolist() == [0, 2]
