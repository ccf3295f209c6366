"""Hypernetwork and learned byte pooling on tiny models built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hypernet.initializer  # noqa: F401  (registers `hypernet`)
import transplant
import transplant.init.byte_pool_learned as bpl
from hypernet.config import HypernetRecipe, load_recipe
from hypernet.lm import lm_parts
from hypernet.losses import TokenizerPieces, aux_loss, lm_loss, make_lm_batch
from hypernet.model import (
    Hypernet,
    HypernetConfig,
    decompose,
    decompose_without_self,
    load_hypernet,
    save_hypernet,
)
from hypernet.sample import TokenizerSampler, build_unigram, substring_counts
from hypernet.train import aux_population, train
from tests.conftest import BASE_CORPUS, DONOR_CORPUS
from transplant.assets import load_vocab
from transplant.errors import TransplantError
from transplant.io.surgery import read_embeddings

TEXT = "The catalogue of cats: for i in range(10): print(i) 12345 café"


def _recipe(tiny_pair, tmp_path, **extra) -> HypernetRecipe:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(BASE_CORPUS + DONOR_CORPUS)
    return load_recipe(data={
        "base": str(tiny_pair["base_untied"]), "output_dir": str(tmp_path / "hn"), "corpus": str(corpus),
        "steps": 40, "vocab_size": [300, 600], "negatives": 32, "aux_tokens": 64, "seq_len": 32,
        "resample_every": 5, "save_every": 10, "log_every": 1, "lr": 1e-2, "warmup": 1, "block_bytes": 20000,
        "model": {"d_model": 32, "layers": 1, "heads": 2}, **extra})


def test_decompose_uses_base_pieces_and_excludes_self(tiny_pair):
    base = load_vocab(tiny_pair["base_tok"])
    ids, mask = decompose(base, [b" catalog", b"", b"x"], max_pieces=8)
    pieces = [base.token_bytes[i] for i, m in zip(ids[0].tolist(), mask[0].tolist()) if m]
    assert b"".join(pieces) == b" catalog"
    assert not mask[1].any() and mask[2].sum() == 1
    long_id = max(range(len(base)), key=lambda i: len(base.token_bytes[i]))
    ids, mask = decompose_without_self(base, [long_id], max_pieces=16)
    parts = [int(i) for i, m in zip(ids[0].tolist(), mask[0].tolist()) if m]
    assert long_id not in parts and len(parts) >= 2
    assert b"".join(base.token_bytes[i] for i in parts) == base.token_bytes[long_id]


def test_sampler_gives_diverse_complete_tokenizers():
    sampler = TokenizerSampler(BASE_CORPUS + DONOR_CORPUS, size_range=(300, 700), seed=1)
    toks = [sampler.sample() for _ in range(4)]
    assert len({len(t) for t in toks}) > 1 or len({tuple(t.token_bytes) for t in toks}) > 1
    for tok in toks:
        ids = tok.encode_batch([TEXT])[0]
        assert b"".join(tok.token_bytes[i] for i in ids) == TEXT.encode()
        assert all(len(bytes([b])) == 1 and bytes([b]) in tok.token_bytes for b in range(256))
    multi = build_unigram([bytes([b]) for b in range(256)] + [b" cat", b"alog"], [-20.0] * 256 + [-1.0, -1.0])
    assert [multi.token_bytes[i] for i in multi.encode_batch([" catalog"])[0]] == [b" cat", b"alog"]


def test_gpt4_style_samples_the_token_shapes_of_llama3_family_tokenizers():
    """Punctuation that takes its newline (`):\n`) and one symbol leading a word (`(message`) exist only under
    the gpt4 style; gpt2 keeps them apart. Both round-trip any text, and a two-style sampler draws both."""
    code = "def f(message=None):\n    return g(message)\nThe cat's mat.\n" * 30
    pieces = [bytes([b]) for b in range(256)] + [b"):\n", b"(message", b"=None"]
    scores = [-20.0] * 256 + [-1.0] * 3
    gpt2, gpt4 = (build_unigram(pieces, scores, style=style) for style in ("gpt2", "gpt4"))
    for tok in (gpt2, gpt4):
        assert b"".join(tok.token_bytes[i] for i in tok.encode_batch([code])[0]) == code.encode()
        assert b"".join(tok.token_bytes[i] for i in tok.encode_batch([TEXT])[0]) == TEXT.encode()
    used = {style: {tok.token_bytes[i] for i in tok.encode_batch([code])[0]} for style, tok in
            (("gpt2", gpt2), ("gpt4", gpt4))}
    assert {b"):\n", b"(message", b"=None"} <= used["gpt4"]
    assert not {b"):\n", b"(message", b"=None"} & used["gpt2"]
    counts = substring_counts(code, styles=("gpt2", "gpt4"))
    assert counts[b"):\n"] == 30 and counts[b"(message"] == 60
    assert b"):\n" not in substring_counts(code)  # gpt2 counting (the default) never sees that shape
    sampler = TokenizerSampler(code + BASE_CORPUS, size_range=(300, 300), seed=0, styles=("gpt2", "gpt4"))
    assert {sampler.sample().name.split("-")[1] for _ in range(12)} == {"gpt2", "gpt4"}
    with pytest.raises(ValueError, match="unknown"):
        TokenizerSampler(code, styles=("sentencepiece",))


def test_untrained_hypernet_is_fvt(tiny_pair):
    emb = read_embeddings(tiny_pair["base_untied"])
    net = Hypernet(HypernetConfig(base_dim=emb.input.shape[1], base_vocab_size=emb.input.shape[0],
                                  untied=True, d_model=16, layers=1, heads=2))
    ids = torch.tensor([[5, 7, 0]])
    mask = torch.tensor([[True, True, False]])
    rows_in, rows_out = net(ids, mask, emb.input, emb.output)
    assert torch.allclose(rows_in[0], emb.input[[5, 7]].float().mean(0), atol=1e-6)
    assert torch.allclose(rows_out[0], emb.output[[5, 7]].float().mean(0), atol=1e-6)


def _fixed_losses(net, tiny_pair):
    """LM and auxiliary loss on a fixed batch, tokenizer and negatives (comparable before/after training)."""
    base = load_vocab(tiny_pair["base_untied"])
    tok = TokenizerSampler(BASE_CORPUS + DONOR_CORPUS, size_range=(500, 500), seed=7).sample()
    pieces = TokenizerPieces(tok, base, net.config.max_pieces)
    texts = [BASE_CORPUS[:200], DONOR_CORPUS[:200], BASE_CORPUS[300:500]]
    from transformers import AutoModelForCausalLM

    parts = lm_parts(AutoModelForCausalLM.from_pretrained(tiny_pair["base_untied"]).eval())
    batch = make_lm_batch(pieces, texts, 32, 32, torch.Generator().manual_seed(0))
    net = net.eval()
    with torch.no_grad():
        rows_in, rows_out = net(pieces.ids[batch.subset], pieces.mask[batch.subset], parts.base_input,
                                parts.base_output)
        lm_part = lm_loss(parts, pieces, batch, rows_in, rows_out, bos_id=0, predict_shared=False)
        pop = torch.tensor(aux_population(base)[:200])
        pred_in, pred_out = net(*decompose_without_self(base, pop.tolist(), 8), parts.base_input,
                                parts.base_output)
        aux_part = aux_loss(pred_in, pred_out, pop, parts)
    return float(lm_part), float(aux_part)


def test_training_reduces_loss_saves_resumes_and_applies(tiny_pair, tmp_path):
    aux_only = load_hypernet(train(_recipe(tiny_pair, tmp_path / "aux", lm_weight=0.0, steps=30)))
    untrained = Hypernet(aux_only.config, float(aux_only.input_std), float(aux_only.output_std))
    lm_before, aux_before = _fixed_losses(untrained, tiny_pair)
    assert _fixed_losses(aux_only, tiny_pair)[1] < aux_before
    # the LM objective alone; its sampled-softmax estimate is noisy on a 500-token vocabulary, so a gentler lr
    # than the aux run (lr 1e-2 raised the fixed loss for one of two seeds, 3e-3 lowered it for both)
    out = train(_recipe(tiny_pair, tmp_path, aux_weight=0.0, lr=3e-3))
    net = load_hypernet(out)
    lm_after, _ = _fixed_losses(net, tiny_pair)
    assert lm_after < lm_before
    assert net.config.untied and net.config.d_model == 32
    assert (out / "checkpoint" / "latest").read_text().strip() == "step_00000040"
    resumed = train(_recipe(tiny_pair, tmp_path, steps=45, resume=True))
    assert (resumed / "checkpoint" / "latest").read_text().strip() == "step_00000045"
    assert ([h["step"] for h in json.loads((resumed / "history.json").read_text())][-6:]
            == [40, 41, 42, 43, 44, 45])
    # only the newest
    assert sorted(p.name for p in (resumed / "checkpoint").glob("step_*")) == ["step_00000045"]
    net = load_hypernet(out)

    result = transplant.transplant(tiny_pair["base_untied"], tiny_pair["donor_tok"], method="hypernet",
                                   output=tmp_path / "model", options={"hypernet": str(out)},
                                   eval_texts={"sample": TEXT})
    assert result.bpb_after is not None and result.bpb_after < result.bpb_before * 3
    notes = result.extra["notes"]
    assert notes["predicted"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base_model = AutoModelForCausalLM.from_pretrained(tiny_pair["base_untied"])
    donor, base = load_vocab(tiny_pair["donor_tok"]), load_vocab(tiny_pair["base_untied"])
    shared = [(i, base.bytes_to_id[b]) for i, b in enumerate(donor.token_bytes) if b in base.bytes_to_id]
    for new_id, old_id in shared[:30]:  # shared tokens are copied, not predicted
        assert torch.equal(model.get_input_embeddings().weight[new_id],
                           base_model.get_input_embeddings().weight[old_id])
    new_ids = [i for i, b in enumerate(donor.token_bytes) if b.strip().isalpha()
               and b not in base.bytes_to_id]
    predicted, _ = net(*decompose(base, [donor.token_bytes[new_ids[0]]], 8), *(
        read_embeddings(tiny_pair["base_untied"]).input, read_embeddings(tiny_pair["base_untied"]).output))
    assert torch.allclose(model.get_input_embeddings().weight[new_ids[0]], predicted[0], atol=1e-5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = Hypernet(HypernetConfig(base_dim=24, base_vocab_size=50, d_model=16, layers=1, heads=2), 0.5)
    torch.nn.init.normal_(net.input_head.weight)
    save_hypernet(net, tmp_path / "hn")
    loaded = load_hypernet(tmp_path / "hn")
    base = torch.randn(50, 24)
    ids, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[True, True, False]])
    assert torch.equal(net.eval()(ids, mask, base)[0], loaded(ids, mask, base)[0])
    assert not any(p.name.endswith((".bin", ".pt", ".pkl")) for p in (tmp_path / "hn").iterdir())


def test_hypernet_errors_are_actionable(tiny_pair, tmp_path):
    with pytest.raises(TransplantError, match="hypernet=PATH"):
        transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="hypernet",
                              output=tmp_path / "a")
    with pytest.raises(TransplantError, match="not a hypernetwork checkpoint"):
        transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="hypernet",
                              output=tmp_path / "b", options={"hypernet": str(tmp_path)})


def test_recipe_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 10\nlr: 1e-4\nmodel:\n  layers: 2\n")
    loaded = load_recipe(recipe, ["steps=3", "model.layers=1", "vocab_size=[10, 20]"])
    assert loaded.steps == 3 and loaded.model.layers == 1 and loaded.vocab_size == [10, 20]
    assert loaded.lr == 1e-4 and loaded.model.heads == HypernetRecipe().model.heads
    with pytest.raises(TransplantError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_byte_pool_learned_fit_and_apply(tiny_pair, tmp_path, monkeypatch):
    base = load_vocab(tiny_pair["base_untied"])
    torch.manual_seed(0)
    byte_vectors = torch.randn(256, 32)  # rows that are a function of the bytes: learnable, generalisable
    rows = torch.stack([byte_vectors[list(b)].mean(0) if b else torch.zeros(32) for b in base.token_bytes])
    _, stats = bpl.fit_pooler(base, rows, None, steps=150, dim=32, lr=5e-3)
    assert stats["heldout_error_after"] < stats["heldout_error_before"]
    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))
    result = transplant.transplant(tiny_pair["base_untied"], tiny_pair["donor_tok"],
                                   method="byte-pool-learned", output=tmp_path / "m",
                                   options={"steps": 30, "dim": 16}, eval_texts={"sample": TEXT})
    assert result.extra["notes"]["predicted"] > 0 and result.bpb_after is not None
    assert list((tmp_path / "cache" / "byte_pool").glob("*.safetensors"))
    again = transplant.transplant(tiny_pair["base_untied"], tiny_pair["donor_tok"],
                                  method="byte-pool-learned", output=tmp_path / "m2",
                                  options={"steps": 30, "dim": 16})
    assert "cached" in again.extra["notes"]


@pytest.mark.parametrize("recipe_path",
                         sorted((Path(__file__).parents[1] / "recipes").glob("hypernet_*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid_and_documented(recipe_path):
    text = recipe_path.read_text()
    header = text.split("\n\n")[0]
    assert text.startswith("#") and "hypernet train" in header and "--set" in header
    assert "transplant --base" in header and "--method hypernet" in header  # the one way to apply it
    recipe = load_recipe(recipe_path)
    assert recipe.model.architecture(576 if "cpu" in recipe_path.name else 4096)["d_model"] > 0


def test_training_refuses_an_output_dir_of_the_users_own_files(tmp_path):
    from hypernet.train import LAYOUT
    from transplant.io.atomic import read_marker
    from transplant.io.claim import claim_output_dir

    def claim(out, protected=()):
        return claim_output_dir(out, kind="hypernet", layout=LAYOUT, protected=protected)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not delete")
    with pytest.raises(TransplantError, match="did not write"):
        claim(mine)
    assert (mine / "thesis.tex").read_text() == "do not delete"
    fresh = tmp_path / "fresh"
    claim(fresh)
    assert read_marker(fresh)["kind"] == "hypernet"
    (fresh / "history.json").write_text("[]")
    claim(fresh)  # a previous run of ours may be continued
    (fresh / "thesis.tex").write_text("do not delete")
    with pytest.raises(TransplantError, match=r"did not write \(thesis.tex\)"):  # nor one the user wrote into
        claim(fresh)
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(TransplantError, match="contains an input of this run"):  # a folder holding the base
        claim(tmp_path, protected=[base])
