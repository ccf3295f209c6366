"""`focus` (FOCUS proper: fastText space on new-tokenizer text, sparsemax over all overlapping tokens) and
`sparsemax-knn` (sparsemax over the top-M donor-space anchors), on tiny vocabularies built here."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.test_align_init import make_vocab as make_greedy_vocab
from transplant.errors import TransplantError
from transplant.init import static_embeddings as static
from transplant.init.base import InitContext, build_embedding
from transplant.init.focus import exact_sparsemax
from transplant.init.registry import get_initializer, get_method
from transplant.solvers.sparsemax import sparsemax
from transplant.tokenizers.align import align
from transplant.tokenizers.vocab import TokenKind, Vocab

N, S = TokenKind.NORMAL, TokenKind.SPECIAL


def make_vocab(pieces: list[bytes], kinds: list[TokenKind]) -> Vocab:
    return make_greedy_vocab(pieces, kinds, {"bos": 0}, {0: "<s>"})


LETTERS = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz .\n"]
WORDS = [b" the", b" cat", b" dog", b" sat", b" ran", b" on", b" to", b" mat", b" park", b" rug"]
BASE = make_vocab([b""] + LETTERS + WORDS, [S] + [N] * (len(LETTERS) + len(WORDS)))
# new: the shared words, plus " kitten" (used exactly like " cat"), " cats" (never in the text: spelling
# only), "zqx" (never in the text, no n-gram in common with it: FVT's row) and a new special without bytes
NEW_PIECES = [b""] + LETTERS + WORDS + [b" kitten", b" cats", b"zqx", b""]
NEW = make_vocab(NEW_PIECES, [S] + [N] * (len(NEW_PIECES) - 2) + [S])
KITTEN, CATS, ZQX = (NEW_PIECES.index(p) for p in (b" kitten", b" cats", b"zqx"))
NEW_SPECIAL = len(NEW_PIECES) - 1


def corpus(n_lines: int = 1500, seed: int = 0) -> str:
    """" cat" and " kitten" appear in identical contexts; " dog" in others; random letter words in between
    (without c, e, h, t, x, z) keep the space from collapsing onto one direction."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.4:
            lines.append(f"the {rng.choice(['cat', 'kitten'])} sat on the {rng.choice(['mat', 'rug'])}.")
        elif r < 0.7:
            lines.append("the dog ran to the park.")
        else:
            lines.append(" ".join("".join(rng.choice("abdfgijklmnopqrsuvwy")
                                          for _ in range(rng.randint(2, 6)))
                                  for _ in range(8)))
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(corpus())
    return path


def focus_ctx(corpus_path, **options) -> InitContext:
    emb = torch.randn(len(BASE), 8, generator=torch.Generator().manual_seed(0))
    opts = {"corpus": str(corpus_path), "dim": 16, "epochs": 30, "min_count": 1, "numbers": False, **options}
    return InitContext(base_vocab=BASE, new_vocab=NEW, alignment=align(BASE, NEW), base_input=emb,
                       base_output=None, options=opts)


def rows_of(weights: torch.Tensor, row: int) -> dict[int, float]:
    weights = weights.coalesce()
    mask = weights.indices()[0] == row
    return dict(zip(weights.indices()[1][mask].tolist(), weights.values()[mask].tolist()))


def test_focus_needs_no_donor_and_builds_sparsemax_rows_over_shared_tokens(corpus_file):
    assert get_method("focus").needs_donor is False
    ctx = focus_ctx(corpus_file)  # donor_input is None: only the tokenizer
    plan = get_initializer("focus")(ctx)
    out = build_embedding(plan, "input", ctx.base_input)
    shared = ctx.alignment.shared_new_ids
    assert torch.equal(out[shared], ctx.base_input[ctx.alignment.new_to_base[shared]])  # exact copies
    shared_base = set(ctx.alignment.new_to_base[shared].tolist())
    for token in (KITTEN, CATS):
        weights = rows_of(plan.input_weights, token)
        assert set(weights) <= shared_base  # support: overlapping tokens only
        assert min(weights.values()) > 0 and sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    notes = plan.notes
    assert notes["new_from_corpus"] == 1 and notes["new_from_subwords"] == 1  # kitten / cats
    assert notes["new_fvt_fallback"] == 2  # zqx and the new special
    assert notes["fasttext_cached"] is False and notes["corpus_tokens"] > 1000


def test_focus_weights_are_exact_sparsemax_of_cosines_to_every_overlapping_token(corpus_file):
    ctx = focus_ctx(corpus_file)
    plan = get_initializer("focus")(ctx)
    model, _ = static.load_or_train(NEW, corpus_file.read_text(), static.FastTextSettings(dim=16, epochs=30,
                                                                                          min_count=1,
                                                                                          seed=0))
    words = static.token_words(NEW)
    shared = [i for i in ctx.alignment.shared_new_ids.tolist() if words[i] and words[i] in model.words]
    anchors, _ = static.token_vectors(model, [words[i] for i in shared])
    target, source = static.token_vectors(model, [words[KITTEN]])
    assert source.tolist() == [static.FROM_CORPUS]
    cos = torch.nn.functional.normalize(target, dim=1) @ torch.nn.functional.normalize(anchors, dim=1).T
    expected = sparsemax(cos)[0]  # temperature 1
    got = rows_of(plan.input_weights, KITTEN)
    for position, new_id in enumerate(shared):
        base_id = int(ctx.alignment.new_to_base[new_id])
        assert got.get(base_id, 0.0) == pytest.approx(float(expected[position]), abs=1e-5)


def test_token_used_like_a_shared_token_gets_nearly_its_row(corpus_file):
    cat = int(align(BASE, NEW).new_to_base[NEW_PIECES.index(b" cat")])
    default = rows_of(get_initializer("focus")(focus_ctx(corpus_file)).input_weights, KITTEN)
    assert max(default, key=default.get) == cat  # T=1: " cat" has the largest weight
    ctx = focus_ctx(corpus_file, temperature=0.1)
    sharp = rows_of(get_initializer("focus")(ctx).input_weights, KITTEN)
    assert sharp[cat] > 0.95
    out = build_embedding(get_initializer("focus")(ctx), "input", ctx.base_input)
    dist = (ctx.base_input - out[KITTEN]).norm(dim=1)
    assert int(dist.argmin()) == cat


def test_tokens_without_any_vector_keep_fvt_rows(corpus_file):
    ctx = focus_ctx(corpus_file)
    out = build_embedding(get_initializer("focus")(ctx), "input", ctx.base_input)
    fvt = build_embedding(get_initializer("fvt")(replace(ctx, options={})), "input", ctx.base_input)
    assert torch.equal(out[ZQX], fvt[ZQX])  # z + q + x
    assert torch.equal(out[NEW_SPECIAL], fvt[NEW_SPECIAL])  # no bytes: the mean row
    assert not torch.allclose(out[KITTEN], fvt[KITTEN])


def test_fasttext_model_is_cached_per_tokenizer_corpus_and_settings(corpus_file, monkeypatch):
    calls = []
    real = static.train_fasttext
    monkeypatch.setattr(static, "train_fasttext", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = get_initializer("focus")(focus_ctx(corpus_file))
    second = get_initializer("focus")(focus_ctx(corpus_file))
    assert len(calls) == 1 and second.notes["fasttext_cached"] is True
    assert torch.equal(first.input_weights.to_dense(), second.input_weights.to_dense())
    assert list((corpus_file.parent / "cache" / "focus").glob("*.tmp")) == []  # renamed into place
    get_initializer("focus")(focus_ctx(corpus_file, epochs=31))  # other settings: another model
    assert len(calls) == 2


def test_bad_corpus_is_a_one_line_error(corpus_file, tmp_path):
    for bad, message in [(tmp_path / "missing.txt", "no such file"), (tmp_path, "no such file")]:
        with pytest.raises(TransplantError, match=message) as err:
            get_initializer("focus")(focus_ctx(bad))
        assert "\n" not in str(err.value) and "corpus=" in str(err.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TransplantError, match="empty"):
        get_initializer("focus")(focus_ctx(empty))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(TransplantError, match="not UTF-8"):
        get_initializer("focus")(focus_ctx(latin1))


def test_exact_sparsemax_matches_full_sparsemax_when_support_outgrows_start_k():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 300, generator=g) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.001])[:, None]
    positions, weights = exact_sparsemax(scores, start_k=2)
    full = sparsemax(scores)
    assert (full > 0).sum(1).max() > 2  # the check had to grow k
    dense = torch.zeros_like(full).scatter_add_(1, positions, weights)
    assert torch.allclose(dense, full, atol=1e-6)


# ------------------------------------------------------------------------------------------- sparsemax-knn

def reference_sparsemax(z: np.ndarray) -> np.ndarray:
    """Sparsemax from its definition (Martins & Astudillo, 2016, Alg. 1), in float64."""
    ordered = np.sort(z)[::-1]
    cumulative = np.cumsum(ordered)
    k = np.arange(1, len(z) + 1)
    support = k[1 + k * ordered > cumulative].max()
    tau = (cumulative[support - 1] - 1) / support
    return np.maximum(z - tau, 0)


def test_sparsemax_knn_is_sparsemax_over_top_m_donor_neighbours():
    base = make_vocab([b""] + [bytes([c]) for c in b"abcdefgh"] + [b"ab", b"cd"], [S] + [N] * 10)
    new_pieces = [b""] + [bytes([c]) for c in b"abcdefgh"] + [b"ab", b"cd", b"abc", b"bcd", b"gh"]
    new = make_vocab(new_pieces, [S] + [N] * 13)
    g = torch.Generator().manual_seed(3)
    donor_in, donor_out = torch.randn(len(new), 6, generator=g), torch.randn(len(new), 6, generator=g)
    donor_in[-1] = 2.5 * donor_in[new_pieces.index(b"cd")]  # "gh" points exactly along "cd" in the donor
    alignment = align(base, new)
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=alignment,
                      base_input=torch.randn(len(base), 4, generator=g), base_output=None,
                      donor_input=donor_in, donor_output=donor_out,
                      options={"top_m": 4, "temperature": 0.5, "numbers": False})
    plan = get_initializer("sparsemax-knn")(ctx)
    assert plan.output_weights is not None  # the donor's own lm_head space gives the output rows
    anchors = [i for i in alignment.shared_new_ids.tolist() if i != 0]
    for weights, donor in ((plan.input_weights, donor_in), (plan.output_weights, donor_out)):
        d = torch.nn.functional.normalize(donor.double(), dim=1).numpy()
        for target in alignment.unshared_new_ids.tolist():
            cos = d[anchors] @ d[target]
            top = np.argsort(-cos)[:4]
            expected = {int(alignment.new_to_base[anchors[j]]): w
                        for j, w in zip(top, reference_sparsemax(cos[top] / 0.5)) if w > 0}
            got = rows_of(weights, target)
            assert got.keys() == expected.keys()
            assert all(got[k] == pytest.approx(v, abs=1e-5) for k, v in expected.items())
    gh = rows_of(plan.input_weights, len(new) - 1)
    assert max(gh, key=gh.get) == int(alignment.new_to_base[new_pieces.index(b"cd")])


def test_focus_transplant_with_a_tokenizer_only_donor(tiny_pair, tmp_path, monkeypatch):
    import json

    from transformers import AutoModelForCausalLM

    import transplant
    from tests.conftest import DONOR_CORPUS

    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "donor.txt"
    text.write_text(DONOR_CORPUS)
    out = tmp_path / "out"
    transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="focus", output=out,
                          options={"corpus": str(text), "dim": 8, "epochs": 2, "min_count": 1})
    notes = json.loads((out / "report.json").read_text())["method_notes"]
    assert (notes["new_from_corpus"] > 0 and notes["overlapping_used"] > 0
            and notes["fasttext_cached"] is False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model.get_input_embeddings().weight).all()
