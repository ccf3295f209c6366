"""Unreachable rows, near-duplicate rows, tie decision, norm rescaling and literal-over-role specials.

Real byte-fallback SentencePiece tokenizers are trained in the test (as in test_vocab.py); models are the tiny
Llamas of conftest.py, tied and untied.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import transplant
from tests.test_align_init import N, S, make_vocab
from tests.test_vocab import SAMPLE, train_sentencepiece
from transplant.assets import load_vocab
from transplant.init.apply import finish_embeddings
from transplant.init.base import InitContext, InitPlan, sparse_rows
from transplant.init.reachable import byte_twins, unreachable_ids, unreachable_piece_ids
from transplant.init.registry import parse_options, resolve_method
from transplant.init.repair import near_duplicates
from transplant.tokenizers.align import align
from transplant.tokenizers.vocab import TokenKind, Vocab


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), "fallback")


# ---------------------------------------------------------------------------------- which ids are unreachable


def test_byte_twins_are_never_emitted_and_other_fallback_bytes_are(sp_path):
    vocab = load_vocab(sp_path)
    twins = set(byte_twins(vocab))
    normal = {p for p, k in zip(vocab.token_bytes, vocab.kinds) if k is TokenKind.NORMAL}
    byte_a = next(i for i, (p, k) in enumerate(zip(vocab.token_bytes, vocab.kinds)) if k is TokenKind.BYTE
                  and p == b"a")
    assert byte_a in twins
    assert all(vocab.token_bytes[i] in normal or vocab.token_bytes[i][0] >= 0xC0 for i in twins)
    emitted = set()
    for text in [SAMPLE, "龘 is not in the vocabulary; neither is ꙮ. \x07 bell"]:
        emitted |= set(vocab.encode(text))
    assert not emitted & twins
    assert not emitted & set(unreachable_ids(vocab).tolist())
    assert any(vocab.kinds[i] is TokenKind.BYTE for i in emitted)  # fallback bytes of 龘 are reachable
    assert all(vocab.token_bytes[i][0] not in (0xC0, 0xC1, 0xFF) for i in emitted
               if vocab.kinds[i] is TokenKind.BYTE)


def test_every_piece_the_tokenizer_emits_is_reachable(sp_path):
    vocab = load_vocab(sp_path)
    unreachable = set(unreachable_ids(vocab).tolist())
    emitted = set(vocab.encode(SAMPLE)) | set(vocab.encode(SAMPLE.replace("\n", " ")))
    assert emitted and not emitted & unreachable


def _hand_bpe(vocab_pieces: list[str], merges: list[tuple[str, str]]) -> Vocab:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    table = {piece: i for i, piece in enumerate(vocab_pieces)}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(table, merges)))
    return Vocab(wrapped, [p.encode() for p in vocab_pieces], [N] * len(vocab_pieces), {})


def test_a_piece_no_merge_can_build_is_unreachable():
    # "abc" is in the vocabulary, but the merges build "ab" and "bc" and nothing joins them with a letter
    vocab = _hand_bpe(["a", "b", "c", "ab", "bc", "abc"], [("a", "b"), ("b", "c")])
    assert unreachable_piece_ids(vocab) == [5]
    assert vocab.encode("abc") == [3, 2]


# ---------------------------------------------------------------------- transplant onto a byte-fallback vocab


def _twin_and_piece(vocab: Vocab) -> list[tuple[int, int]]:
    """(byte-fallback twin, the normal piece with the same byte) pairs."""
    table = vocab.bytes_to_id  # a normal piece wins over its byte-fallback twin here
    return [(i, table[vocab.token_bytes[i]]) for i in byte_twins(vocab)
            if vocab.kinds[table[vocab.token_bytes[i]]] is TokenKind.NORMAL]


@pytest.mark.parametrize("base_key", ["base_tied", "base_untied"])
def test_unreachable_rows_take_no_output_mass(tiny_pair, sp_path, tmp_path, base_key):
    out = tmp_path / "out"
    transplant.transplant(tiny_pair[base_key], sp_path, method="fvt", output=out)
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_pair[base_key])
    new_vocab, base_vocab = load_vocab(sp_path), load_vocab(tiny_pair[base_key])
    pairs = _twin_and_piece(new_vocab)
    assert len(pairs) > 20
    normal = torch.tensor([i for i, k in enumerate(base_vocab.kinds) if k is not S])
    head, base_head = model.get_output_embeddings().weight, base.get_output_embeddings().weight
    mean = base_head[normal].mean(0)
    twins, pieces = [t for t, _ in pairs], [p for _, p in pairs]
    assert torch.allclose(head[twins], mean.expand(len(twins), -1), atol=1e-6)
    # the mean row's logit is the mean base logit, so it can never outweigh a piece the model predicts
    hidden = torch.randn(64, head.shape[1], generator=torch.Generator().manual_seed(0))
    base_logits = hidden @ base_head[normal].T
    twin_logit = hidden @ head[twins[0]]
    assert torch.allclose(twin_logit, base_logits.mean(1), atol=1e-4)
    assert bool((twin_logit
                 <= torch.logsumexp(base_logits, 1) - torch.log(torch.tensor(float(len(normal))))).all())
    if base_key == "base_untied":  # the input row is never read, so it stays the copy of its piece
        embed = model.get_input_embeddings().weight
        assert torch.equal(embed[twins], embed[pieces])
    report = json.loads((out / "report.json").read_text())
    assert report["unreachable_rows"]["count"] == len(unreachable_ids(new_vocab)) >= len(twins)
    assert report["statistics"]["unreachable_rows"] == report["unreachable_rows"]["count"]
    assert any(example.startswith("<0x") for example in report["unreachable_rows"]["examples"])


def test_keep_leaves_the_twin_copies(tiny_pair, sp_path, tmp_path):
    out = tmp_path / "out"
    transplant.transplant(tiny_pair["base_tied"], sp_path, method="fvt", output=out,
                          options={"unreachable": "keep"})
    head = AutoModelForCausalLM.from_pretrained(out).get_output_embeddings().weight
    twin, piece = _twin_and_piece(load_vocab(sp_path))[0]
    assert torch.equal(head[twin], head[piece])


# -------------------------------------------------------------------------------------------- near-duplicates


def _dup_setup(tied: bool, seed: int = 0):
    base = make_vocab([b"", b"i", b"s", b"is", b" ", b" the", b"x", b"q", b"ra", b"re"], [S] + [N] * 9,
                      {"bos": 0}, {0: "<s>"})
    new = make_vocab([b"", b"is", b" ", b" the", b"isis", b" rare", b"x", b"q"], [S] + [N] * 7, {"bos": 0},
                     {0: "<s>"})
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(base), 16, generator=g)
    out = None if tied else torch.randn(len(base), 16, generator=g)
    ctx = InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=emb,
                      base_output=out, options=parse_options("fvt", {}))
    return ctx


def _plan_with_space_copy(ctx: InitContext) -> InitPlan:
    """A method that writes a near-copy of ` ` onto ` rare` (what omp did to `▁LGAGEmoji`)."""
    rows, cols, vals = ([0, 1, 2, 3, 6, 7, 4, 5, 5], [0, 3, 4, 5, 6, 7, 3, 4, 7],
                        [1, 1, 1, 1, 1, 1, 1, 1.0, 0.02])
    return InitPlan(sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab))))


@pytest.mark.parametrize("tied", [True, False])
def test_near_copies_of_frequent_rows_fall_back_to_fvt_or_the_midpoint(tied):
    ctx = _dup_setup(tied)
    fvt = resolve_method("fvt", {})
    new_input, new_output, plan = finish_embeddings(ctx, _plan_with_space_copy(ctx), fvt)
    repairs = plan.notes["repairs"]
    found = {(d, m) for d, m, _ in repairs.duplicates}
    assert (5, 2) in found and (4, 1) in found  # " rare" ≈ " ", "isis" ≈ "is"
    for matrix, base in [(new_input, ctx.base_input)] + ([] if tied else [(new_output, ctx.base_output)]):
        normal = base[1:].mean(0)
        # " rare" falls back to fvt: the mean of its base pieces " ", "ra", "re"
        assert torch.allclose(matrix[5], base[[4, 8, 9]].mean(0), atol=1e-6)
        # fvt's "isis" is "is" again (mean of two "is"): the midpoint with the mean row instead
        assert torch.allclose(matrix[4], (base[3] + normal) / 2, atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(matrix[[4, 5]], matrix[[1, 2]])
        assert bool((cos < 0.99).all())
        assert torch.equal(matrix[1], base[3]) and torch.equal(matrix[2], base[4])  # shared rows untouched


def test_dedup_can_be_switched_off():
    ctx = _dup_setup(True)
    fvt = resolve_method("fvt", {"dedup_cosine": 1})
    new_input, _, plan = finish_embeddings(ctx, _plan_with_space_copy(ctx), fvt)
    assert plan.notes["repairs"].duplicates == []
    assert torch.allclose(new_input[4], ctx.base_input[3])


def test_near_duplicate_search_matches_exact_cosines():
    g = torch.Generator().manual_seed(3)
    matrix = torch.randn(3000, 256, generator=g)
    reference = torch.arange(100)
    matrix[500] = matrix[7] + 0.05 * torch.randn(256, generator=g)  # cosine ≈ 0.999
    matrix[900] = matrix[8] + 0.3 * torch.randn(256, generator=g)  # cosine ≈ 0.96: not a duplicate
    ids = torch.arange(100, 3000)
    found, matched, cos = near_duplicates(matrix, ids, reference, 0.99)
    exact = (torch.nn.functional.normalize(matrix[ids], dim=1)
             @ torch.nn.functional.normalize(matrix[:100], dim=1).T)
    assert found.tolist() == (ids[exact.max(1).values > 0.99]).tolist() == [500]
    assert matched.tolist() == [7] and float(cos[0]) > 0.99


# ------------------------------------------------------------------------------ norms, ties, special literals


@pytest.mark.parametrize("mode", ["pieces", "median"])
def test_rescale_norm(mode):
    ctx = _dup_setup(True)
    fvt = resolve_method("fvt", {"rescale_norm": mode, "dedup_cosine": 1})
    new_input, _, _ = finish_embeddings(ctx, fvt.plan(ctx), fvt)
    norms = ctx.base_input.norm(dim=1)
    if mode == "pieces":  # " rare" = mean(" ", "ra", "re"), shorter than its pieces until rescaled
        assert new_input[5].norm() > ctx.base_input[[4, 8, 9]].mean(0).norm()
        assert torch.allclose(new_input[5].norm(), norms[[4, 8, 9]].mean())
    else:
        assert torch.allclose(new_input[5].norm(), norms[1:].median())
    assert torch.equal(new_input[1], ctx.base_input[3])  # shared rows keep their norm
    assert parse_options("fvt", {"rescale_norm": "true"})["rescale_norm"] == "pieces"


def test_tied_base_stays_tied_unless_asked(tiny_pair, tmp_path):
    transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_model"], method="omp",
                          output=tmp_path / "a", options={"k": 4})
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a").config.tie_word_embeddings is True
    transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_model"], method="omp",
                          output=tmp_path / "b", options={"k": 4, "untie": True})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)


def test_literal_special_match_wins_over_role():
    # SmolLM2: <|endoftext|> (literal, role unk) and <|im_end|> (role eos); Qwen: <|endoftext|> with role eos
    base = make_vocab([b"", b"", b"", b"a"], [S, S, S, N], {"unk": 0, "bos": 1, "eos": 2},
                      {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"})
    new = make_vocab([b"a", b"", b"", b""], [N, S, S, S], {"eos": 1, "bos": 3},
                     {1: "<|endoftext|>", 2: "<|im_end|>", 3: "<s>"})
    alignment = align(base, new)
    assert alignment.new_to_base.tolist() == [3, 0, 2, 1]  # <s> has no literal twin: matched by its role
    assert alignment.matched_by_role == {"bos": (3, 1)}


@pytest.mark.slow
def test_real_mistral_v3_twins_get_the_mean_row():
    """SmolLM2-135M <- Mistral v3 (the README demo pair): 125 byte-fallback twins + 13 bytes never in
    UTF-8."""
    from transplant.assets.sources import resolve_source
    from transplant.io import surgery
    from transplant.pipeline import new_embeddings

    base_src = resolve_source("smollm2-135m", need_model=True)
    base_vocab, new_vocab = load_vocab(base_src.tokenizer_spec), load_vocab("mistral-v3")
    assert len(byte_twins(new_vocab)) == 138 and unreachable_piece_ids(new_vocab) == []
    emb = surgery.read_embeddings(base_src.model_dir)
    ctx = InitContext(base_vocab=base_vocab, new_vocab=new_vocab, alignment=align(base_vocab, new_vocab),
                      base_input=emb.input, base_output=None, options=parse_options("fvt", {}))
    new_input, new_output, plan = new_embeddings(ctx, resolve_method("fvt", {}))
    assert new_output is None and len(plan.notes["repairs"].unreachable) == 138
    normal = torch.tensor([i for i, k in enumerate(base_vocab.kinds) if k is not S])
    twin, piece = _twin_and_piece(new_vocab)[0]
    assert torch.allclose(new_input[twin], emb.input[normal].float().mean(0), atol=1e-6)
    assert not torch.allclose(new_input[twin], new_input[piece])
