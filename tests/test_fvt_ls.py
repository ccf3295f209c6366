"""`fvt-ls`: FVT's pieces with weights fitted in the donor space, shrunk towards FVT's equal weights."""

from __future__ import annotations

import torch

from tests.test_align_init import make_vocab
from transplant.init.base import InitContext, build_embedding
from transplant.init.fvt_ls import ridge_weights
from transplant.init.registry import get_initializer
from transplant.tokenizers.align import align
from transplant.tokenizers.vocab import TokenKind

N, S = TokenKind.NORMAL, TokenKind.SPECIAL
PLAIN = {"pursue_gap": 0.0, "pursue_min_cosine": 0.0}  # fvt-ls without its default gap pursuit


def _pair():
    # base pieces: " cat" (1), "alog" (2), "do" (3), "g" (4), "zz"(5); new adds " catalog" (5) and "dog" (6)
    base = make_vocab([b"", b" cat", b"alog", b"do", b"g", b"zz"], [S, N, N, N, N, N], {"bos": 0}, {0: "<s>"})
    new = make_vocab([b"", b" cat", b"alog", b"do", b"g", b" catalog", b"dog", b"dozz"],
                     [S, N, N, N, N, N, N, N], {"bos": 0}, {0: "<s>"})
    g = torch.Generator().manual_seed(0)
    base_rows = torch.randn(6, 8, generator=g)
    donor = torch.randn(8, 12, generator=g)
    donor[5] = 0.8 * donor[1] + 0.3 * donor[2]  # " catalog" composes exactly in the donor space
    donor[6] = 0.5 * donor[3] + 0.5 * donor[4]  # "dog" is exactly FVT's mean there
    return base, new, base_rows, donor


def _run(ridge: float, neighbours: int = 0) -> torch.Tensor:
    base, new, base_rows, donor = _pair()
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=base_rows,
                      base_output=None, donor_input=donor, options={"ridge": ridge, "neighbours": neighbours,
                                                                   "numbers": False, **PLAIN})
    return build_embedding(get_initializer("fvt-ls")(ctx), "input", base_rows), base_rows


def test_least_squares_recovers_the_donor_composition():
    out, e = _run(ridge=0.0)
    assert torch.allclose(out[5], 0.8 * e[1] + 0.3 * e[2], atol=1e-4)
    assert torch.allclose(out[6], 0.5 * e[3] + 0.5 * e[4], atol=1e-4)
    assert torch.equal(out[1], e[1])  # shared tokens are exact copies


def test_a_piece_without_a_donor_row_keeps_fvt():
    out, e = _run(ridge=0.0)
    assert torch.allclose(out[7], (e[3] + e[5]) / 2, atol=1e-5)  # "dozz" = "do" + "zz"; "zz" is not an anchor


def test_large_ridge_is_fvt():
    out, e = _run(ridge=1e6)
    assert torch.allclose(out[5], (e[1] + e[2]) / 2, atol=1e-4)


def test_ridge_weights_padding_and_shrinkage():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 4, 6, generator=g)
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rows = rows * valid[..., None]
    prior = valid / valid.sum(1, keepdim=True)
    target = torch.randn(3, 6, generator=g)
    w = ridge_weights(target, rows, prior, valid, ridge=0.5)
    assert torch.all(w[~valid] == 0)
    # each row is the closed-form ridge solution on its own valid slots
    for b in range(3):
        a = rows[b, valid[b]]
        s2 = (a * a).sum(1).mean()
        m = a.shape[0]
        expected = torch.linalg.solve(a @ a.T + 0.5 * s2 * torch.eye(m),
                                      a @ target[b] + 0.5 * s2 * prior[b, valid[b]])
        assert torch.allclose(w[b, valid[b]], expected, atol=1e-5)


def test_neighbours_widen_the_support():
    out0, _ = _run(ridge=0.0)
    out2, _ = _run(ridge=0.0, neighbours=2)
    assert torch.isfinite(out2).all()
    assert torch.allclose(out2[5], out0[5], atol=1e-3)  # an exact composition stays exact with more atoms


def _rows(method: str, options: dict) -> torch.Tensor:
    base, new, base_rows, donor = _pair()
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=base_rows,
                      base_output=None, donor_input=donor,
                      options={"numbers": False, **(PLAIN if method == "fvt-ls" else {}), **options})
    return build_embedding(get_initializer(method)(ctx), "input", base_rows)


def test_pursued_classes_take_exact_omps_rows_and_every_other_token_keeps_fvt_ls():
    """`pursue=space-word`: " catalog" (a space-word) gets exact OMP's row (k=1: one anchor, unlike its
    fvt-ls row over two pieces); "dog" and "dozz" (word pieces) keep fvt-ls's rows; shared rows are copies."""
    plain = _rows("fvt-ls", {"ridge": 0.0})
    mixed = _rows("fvt-ls", {"ridge": 0.0, "pursue": "space-word", "pursue_k": 1})
    pursued = _rows("omp", {"k": 1, "prefilter": 0})
    assert torch.allclose(mixed[5], pursued[5], atol=1e-6)
    assert not torch.allclose(mixed[5], plain[5], atol=1e-3)
    assert torch.equal(mixed[6], plain[6]) and torch.equal(mixed[7], plain[7])
    assert torch.equal(mixed[1], plain[1])


def test_pursue_names_only_known_token_classes():
    import pytest

    from transplant.errors import TransplantError
    from transplant.init.registry import resolve_method

    with pytest.raises(TransplantError, match="unknown token classes"):
        resolve_method("fvt-ls", {"pursue": "space-words"})
    assert resolve_method("fvt-ls", {"pursue": "Space-Word+digits"}).options["pursue"] == "space-word+digits"


def test_pursue_gap_takes_omps_row_only_where_fvt_ls_reconstructs_the_donor_row_worse():
    """With ridge → ∞ (FVT's equal weights), " catalog" (0.8·cat + 0.3·alog in the donor space) is fitted
    badly and OMP (k=2) fits it exactly: it takes OMP's row. "dog" is exactly FVT's mean there (no gap): it
    keeps fvt-ls's row; "dozz" has a piece without a donor row (no error to compare): it keeps FVT's."""
    plain = _rows("fvt-ls", {"ridge": 1e6})
    mixed = _rows("fvt-ls", {"ridge": 1e6, "pursue_gap": 0.05, "pursue_k": 2})
    pursued = _rows("omp", {"k": 2, "prefilter": 0})
    assert torch.allclose(mixed[5], pursued[5], atol=1e-5)
    assert not torch.allclose(plain[5], pursued[5], atol=1e-3)
    assert torch.equal(mixed[6], plain[6]) and torch.equal(mixed[7], plain[7])
    # a screened pursuit whose candidates are every anchor, in the full donor space, is the exact one
    screened = _rows("fvt-ls", {"ridge": 1e6, "pursue_gap": 0.05, "pursue_k": 2, "pursue_screen": 12,
                                "pursue_candidates": 100})
    assert torch.allclose(screened, mixed, atol=1e-5)


def test_pursue_min_cosine_skips_the_pursuit_for_tokens_no_anchor_points_to():
    """" catalog" (0.8·cat + 0.3·alog) has " cat" at a high |cosine|: a threshold just below it keeps the gap
    rule's result, one just above it leaves every token with fvt-ls's row (nothing pursued)."""
    _, _, _, donor = _pair()
    anchors = donor[1:5]
    best = float((torch.nn.functional.normalize(donor[5], dim=0)
                  @ torch.nn.functional.normalize(anchors, dim=1).T).abs().max())
    plain = _rows("fvt-ls", {"ridge": 1e6})
    gap = {"ridge": 1e6, "pursue_gap": 0.05, "pursue_k": 2}
    mixed = _rows("fvt-ls", gap)
    below = _rows("fvt-ls", {**gap, "pursue_min_cosine": best - 1e-3})
    above = _rows("fvt-ls", {**gap, "pursue_min_cosine": best + 1e-3})
    assert torch.allclose(below, mixed, atol=1e-6)
    assert torch.equal(above, plain)


def test_the_default_is_the_gap_pursuit_screened_by_cosine_with_the_prior_cap():
    """What `transplant` runs with a donor model and no options (bench/RESULTS.md, "The switched rows' logit
    prior": better than plain fvt-ls on every held-out slice of both SmolLM2 <-> Gemma-3 directions)."""
    from transplant.init.registry import resolve_method
    from transplant.pipeline import default_method

    options = resolve_method(default_method(True), {}).options
    assert (default_method(True), options["pursue_gap"], options["pursue_min_cosine"],
            options["pursue_prior_cap"]) == ("fvt-ls", 0.4, 0.6, True)
