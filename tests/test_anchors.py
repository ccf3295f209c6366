"""Anchors of the donor methods: shared, trained, and one per base row (a byte-fallback twin is not one)."""

from __future__ import annotations

import torch

from tests.test_align_init import make_vocab
from transplant.init.base import InitContext, build_embedding
from transplant.init.donor import select_anchors
from transplant.init.registry import get_initializer
from transplant.tokenizers.align import align
from transplant.tokenizers.vocab import TokenKind

N, B, S = TokenKind.NORMAL, TokenKind.BYTE, TokenKind.SPECIAL


def _pair():
    """The donor has "\\n" twice (a normal token, id 2, and the byte-fallback `<0x0A>`, id 5): both align to
    the base's "\\n" row. The donor row of the byte twin is unlike the normal token's; the new token "!\\n"
    (id 6) is that twin's row exactly, so an anchor set that holds the twin rebuilds it perfectly in the donor
    space while the base row it would borrow is the normal "\\n"."""
    base = make_vocab([b"", b"\n", b"!", b"a"], [S, N, N, N], {"bos": 0}, {0: "<s>"})
    new = make_vocab([b"", b"a", b"\n", b"!", b"zz", b"\n", b"!\n"], [S, N, N, N, N, B, N], {"bos": 0},
                     {0: "<s>"})
    g = torch.Generator().manual_seed(0)
    base_rows = torch.randn(4, 6, generator=g)
    donor = torch.randn(7, 10, generator=g)
    donor[5] = 0.9 * donor[3] + 0.3 * torch.randn(10, generator=g)  # the twin leans towards "!"
    donor[6] = donor[5]
    return base, new, base_rows, donor


def _ctx(options: dict) -> InitContext:
    base, new, base_rows, donor = _pair()
    return InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=base_rows,
                       base_output=None, donor_input=donor, options={"numbers": False, **options})


def test_a_byte_fallback_twin_of_a_normal_token_is_not_an_anchor():
    ctx = _ctx({})
    assert ctx.alignment.new_to_base[torch.tensor([2, 5])].tolist() == [1, 1]  # both twins share base "\n"
    anchors = select_anchors(ctx, 0.0)
    assert anchors.new_ids.tolist() == [1, 2, 3]  # "a", the normal "\n", "!"
    assert anchors.base_ids.tolist() == [3, 1, 2]
    assert anchors.twins == 1 and anchors.excluded == 0


def test_a_twin_is_kept_when_the_normal_token_is_not_an_anchor():
    ctx = _ctx({})
    ctx.donor_input[2] = 0.0  # the normal "\n" looks untrained in the donor: the byte twin stands for the row
    anchors = select_anchors(ctx, 0.5)
    assert 5 in anchors.new_ids.tolist() and 2 not in anchors.new_ids.tolist()
    assert anchors.twins == 0 and anchors.excluded == 1


def test_omp_does_not_compose_from_a_twin():
    """With the twin an anchor, OMP (k=1) would copy the base "\\n" row into "!\\n" (the twin's donor row
    matched exactly); without it, the nearest anchor is "!", whose base row it scales."""
    ctx = _ctx({"k": 1, "prefilter": 0})
    plan = get_initializer("omp")(ctx)
    rows = build_embedding(plan, "input", ctx.base_input)
    def cosine(base_id: int) -> float:
        return abs(float(torch.nn.functional.cosine_similarity(rows[6], ctx.base_input[base_id], dim=0)))

    assert plan.notes["anchors_excluded_twins"] == 1
    assert cosine(2) > 0.999 and cosine(1) < 0.9
