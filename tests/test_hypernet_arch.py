"""The hypernetwork on any causal-LM base: tiny Llama, Gemma-3 (sqrt(d) embedding scale, logit soft-capping),
GPT-2 (position embeddings, an output bias) and GPT-NeoX models built here. The hypernetwork's LM path is
checked against each model's own forward on the same ids, fed the model's own rows and exact-FVT rows; then
each trains a few steps and applies through `transplant --method hypernet`."""

from __future__ import annotations

import shutil

import pytest
import torch

import hypernet.initializer  # noqa: F401  (registers `hypernet`)
import transplant
from hypernet.config import load_recipe
from hypernet.lm import embed, hidden_states, lm_parts, output_logits
from hypernet.losses import LMBatch, TokenizerPieces, lm_loss
from hypernet.model import Hypernet, HypernetConfig, base_stats, decompose, load_hypernet
from hypernet.sample import real_tokenizer
from hypernet.train import train
from tests.conftest import BASE_CORPUS, DONOR_CORPUS
from transplant.assets import load_vocab

ARCHS = ["llama", "gemma3", "gpt2", "neox"]


def build_model(arch: str, vocab_size: int, bos: int, eos: int, pad: int, seed: int = 0):
    """A tiny causal LM of the given family (Gemma-3 soft-capped hard, GPT-2 with an lm_head bias)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=False, **ids))
    if arch == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=8,
                                                  final_logit_softcapping=2.0, sliding_window=8, **ids))
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=1024, **ids))
        model.lm_head.bias = torch.nn.Parameter(torch.randn(vocab_size))  # an output bias to honour
        return model
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            tie_word_embeddings=False, **ids))


@pytest.fixture(scope="module")
def base_vocab(tiny_pair):
    return load_vocab(tiny_pair["base_tok"])


def _model(arch: str, base_vocab):
    roles = base_vocab.roles
    return build_model(arch, len(base_vocab), roles["bos"], roles["eos"], roles["pad"]).eval()


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_own_rows_through_the_hypernet_path_equal_the_models_forward(arch, base_vocab):
    model = _model(arch, base_vocab)
    parts = lm_parts(model)
    ids = _ids(len(base_vocab))
    rows_out = parts.base_output if parts.base_output is not None else parts.base_input
    with torch.no_grad():
        hidden = hidden_states(parts, embed(parts, parts.base_input, ids),
                               torch.ones_like(ids, dtype=torch.bool))
        logits = output_logits(parts, hidden, rows_out, parts.output_bias)
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    if arch == "gemma3":  # what the old `inputs_embeds=rows` path computed: unscaled inputs, no soft-cap
        assert parts.softcap == 2.0 and expected.abs().max() <= 2.0
        with torch.no_grad():
            naive = parts.decoder(inputs_embeds=parts.base_input[ids]).last_hidden_state @ rows_out.T
        assert not torch.allclose(naive, expected, atol=1e-2)
    if arch == "gpt2":
        assert parts.output_bias is not None and parts.tied


def _reference_model(arch: str, model, pieces: TokenizerPieces, bos: int):
    """The same body with a vocabulary of the sampled tokenizer's ids plus one (the base BOS), whose rows ARE
    the exact FVT rows (mean of the base pieces' rows; output bias copied for shared tokens, else
    averaged)."""
    parts = lm_parts(model)
    size = len(pieces.tok) + 1
    ref = build_model(arch, size, bos, bos, bos, seed=1).eval()
    body = {k: v for k, v in model.state_dict().items() if ref.state_dict()[k].shape == v.shape}
    ref.load_state_dict(body, strict=False)
    mask = pieces.mask.float()[..., None]

    def fvt(rows: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        out = (rows[pieces.ids] * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.cat([out, extra[None]])

    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(fvt(parts.base_input, parts.base_input[bos]))
        if parts.base_output is not None:
            ref.get_output_embeddings().weight.copy_(fvt(parts.base_output, parts.base_output[bos]))
        if parts.output_bias is not None:
            bias = fvt(parts.output_bias[:, None], parts.output_bias[bos][None])[:, 0]
            shared = torch.cat([pieces.base_id >= 0, torch.tensor([False])])
            base_ids = torch.cat([pieces.base_id, torch.tensor([bos])]).clamp_min(0)
            ref.get_output_embeddings().bias = torch.nn.Parameter(
                torch.where(shared, parts.output_bias[base_ids], bias))
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_fvt_rows_through_the_lm_loss_equal_the_fvt_models_forward(arch, base_vocab, tiny_pair):
    """An untrained hypernetwork is FVT; with every token predicted (predict_shared) and the softmax subset
    covering the whole sampled vocabulary (so the sampled-softmax correction is log 1 = 0), the LM loss must
    be the cross-entropy of a model whose rows ARE the FVT rows, run by its own forward on the same ids."""
    model = _model(arch, base_vocab)
    parts = lm_parts(model)
    # another tokenizer: its FVT rows are not the base's
    tok = real_tokenizer(load_vocab(tiny_pair["donor_tok"]))
    pieces = TokenizerPieces(tok, base_vocab, max_pieces=8)
    net = Hypernet(HypernetConfig(base_dim=32, base_vocab_size=len(base_vocab), untied=not parts.tied,
                                  d_model=16, layers=1, heads=2),
                   *base_stats(parts.base_input, parts.base_output))
    ids = torch.tensor([seq[:20] for seq in tok.encode_batch([BASE_CORPUS[:150], DONOR_CORPUS[:150]])])
    subset = torch.nonzero(pieces.has_pieces).flatten()
    seen = torch.zeros(len(tok), dtype=torch.bool)
    seen[ids] = True
    batch = LMBatch(ids, torch.ones_like(ids, dtype=torch.bool), subset, seen[subset],
                    int((pieces.has_pieces & ~seen).sum()))
    bos = base_vocab.roles["bos"]
    ref = _reference_model(arch, model, pieces, bos)
    with torch.no_grad():
        rows_in, rows_out = net(pieces.ids[subset], pieces.mask[subset], parts.base_input, parts.base_output)
        loss = lm_loss(parts, pieces, batch, rows_in, rows_out, bos_id=bos, predict_shared=True)
        logits = ref(input_ids=torch.cat([torch.full((2, 1), len(tok)), ids], 1)).logits[:, :-1]
    local = torch.full((len(tok),), -1)
    local[subset] = torch.arange(subset.numel())
    expected = torch.nn.functional.cross_entropy(logits[..., subset].reshape(-1, subset.numel()),
                                                 local[ids].reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_padding_idx_does_not_block_gradients_of_local_rows(base_vocab):
    """Rows are indexed by local ids; the model's padding_idx (Llama: pad id) must not zero one of them."""
    model = _model("llama", base_vocab)
    assert model.get_input_embeddings().padding_idx is not None
    parts = lm_parts(model)
    rows = torch.randn(8, 32, requires_grad=True)
    embed(parts, rows, torch.arange(8)[None]).sum().backward()
    assert (rows.grad.abs().sum(1) > 0).all()
    assert model.get_input_embeddings().padding_idx is not None  # the model itself is untouched


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_and_applies_on_each_family(arch, base_vocab, tiny_pair, tmp_path):
    model_dir = tmp_path / arch
    model = _model(arch, base_vocab)
    if arch == "gpt2":
        model.lm_head.bias = None  # the saved GPT-2 format has no lm_head bias (the forward tests cover one)
    model.save_pretrained(model_dir)
    for item in tiny_pair["base_tok"].iterdir():
        shutil.copy(item, model_dir / item.name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(BASE_CORPUS + DONOR_CORPUS)
    recipe = load_recipe(data={
        "base": str(model_dir), "output_dir": str(tmp_path / "hn"), "corpus": str(corpus), "steps": 3,
        "vocab_size": [300, 600], "negatives": 32, "aux_tokens": 32, "seq_len": 24, "block_bytes": 20000,
        "log_every": 1, "lr": 1e-2, "warmup": 1, "model": {"d_model": 16, "layers": 1, "heads": 2}})
    out = train(recipe)
    net = load_hypernet(out)
    parts = lm_parts(model)
    assert net.config.untied == (parts.base_output is not None)
    moved = any(p.abs().sum() > 0 for n, p in net.named_parameters()
                if n.startswith(("input_head", "output_head")))
    assert moved  # the zero-initialised heads left FVT
    result = transplant.transplant(model_dir, tiny_pair["donor_tok"], method="hypernet",
                                   output=tmp_path / "model", options={"hypernet": str(out)},
                                   eval_texts={"sample": DONOR_CORPUS[:300]})
    assert result.extra["notes"]["predicted"] > 0 and result.bpb_after is not None
    donor = load_vocab(tiny_pair["donor_tok"])
    new = [i for i, b in enumerate(donor.token_bytes) if b.strip().isalpha()
           and b not in base_vocab.bytes_to_id][0]
    from transformers import AutoModelForCausalLM

    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        predicted, _ = net(*decompose(base_vocab, [donor.token_bytes[new]], 8), parts.base_input,
                           parts.base_output)
    torch.testing.assert_close(applied.get_input_embeddings().weight[new], predicted[0], atol=1e-5, rtol=1e-5)
