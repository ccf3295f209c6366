"""Issue 25: `export-gguf` for Qwen2 and Gemma-3, with the keys, tensor names and tensor transformations of
llama.cpp's own converter, read back with gguf's reader and with transformers' GGUF loader (which undoes
Gemma's norm shift): tiny random models here, the real Gemma-3-270M against its llama.cpp-made GGUF (slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BASE_CORPUS, CHATML, DONOR_CORPUS
from transplant.assets import load_vocab
from transplant.assets.catalog import GEMMA_CHAT_TEMPLATE
from transplant.errors import TransplantError
from transplant.io.gguf_export import export_gguf
from transplant.io.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED

TEXTS = ("The quick brown fox 12345 jumps", "def add(a, b):\n\treturn a + b  # café",
         "<|im_start|>user\nhi<|im_end|>")
# what convert_hf_to_gguf.py writes under `<arch>.` (its generic TextModel keys, plus Gemma3Model's)
QWEN2_KEYS = {"block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.freq_base",
              "attention.layer_norm_rms_epsilon"}
GEMMA3_KEYS = QWEN2_KEYS | {"attention.key_length", "attention.value_length", "attention.sliding_window",
                            "rope.freq_base_swa"}
LAYER_TENSORS = {
    "qwen2": ["attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias",
              "attn_v.weight", "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
              "ffn_up.weight", "ffn_down.weight"],
    "gemma3": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q_norm.weight",
               "attn_k_norm.weight", "attn_output.weight", "post_attention_norm.weight", "ffn_norm.weight",
               "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"],
}


def _read(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _values(tensor) -> torch.Tensor:
    """An f32 GGUF tensor in transformers' orientation (GGUF shapes are reversed)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return torch.from_numpy(np.asarray(tensor.data).reshape(shape).copy())


def _arch_keys(fields: dict, arch: str) -> dict:
    return {key[len(arch) + 1:]: value for key, value in fields.items() if key.startswith(arch + ".")}


def _finish_tokenizer(directory, **config_updates) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(config_updates)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    """A tiny untied Qwen2 (q/k/v biases) with a byte-level BPE split like Qwen's, ChatML specials, an added
    non-special `<tool_call>` and 4 padded embedding rows."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from transplant.tokenizers.formats import PATTERNS

    directory = tmp_path_factory.mktemp("qwen2") / "model"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS["qwen"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([BASE_CORPUS + DONOR_CORPUS], trainer=trainer)
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(directory)
    _finish_tokenizer(directory, tokenizer_class="PreTrainedTokenizerFast", chat_template=CHATML)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=len(tokenizer) + 4, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=1_000_000.0, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)  # biases start at zero: make them count in the logits check
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gemma3_model(tmp_path_factory):
    """A tiny tied Gemma-3 with a Gemma-style SentencePiece vocabulary (no prefix space, byte fallback, turn
    markers as control pieces, a user-defined `<table>`), random norm weights and 5 padded rows. head_dim and
    query_pre_attn_scalar are 256 as in the real models: transformers' GGUF reader assumes both."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tests.test_vocab import train_sentencepiece

    root = tmp_path_factory.mktemp("gemma3")
    model_file = train_sentencepiece(
        root / "sp", "gemma", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", add_dummy_prefix=False, user_defined_symbols=["<table>"],
        control_symbols=["<start_of_turn>", "<end_of_turn>", "<unused0>"])
    vocab = load_vocab(model_file)
    directory = root / "model"
    vocab.save(directory)
    _finish_tokenizer(directory, chat_template=GEMMA_CHAT_TEMPLATE)
    torch.manual_seed(5)
    config = Gemma3TextConfig(vocab_size=len(vocab) + 5, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                              query_pre_attn_scalar=256, sliding_window=16, max_position_embeddings=128,
                              bos_token_id=vocab.roles["bos"], eos_token_id=vocab.roles["eos"],
                              pad_token_id=vocab.roles["pad"])
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.3)  # Gemma initialises them to 0 (x * (1 + 0)): make the shift visible
    model.save_pretrained(directory)
    return directory


def _expected_tensors(arch: str, layers: int, tied: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    return names | {f"blk.{i}.{t}" for i in range(layers) for t in LAYER_TENSORS[arch]}


def _same_logits(directory, path) -> None:
    """transformers' reading of the GGUF (which undoes the Gemma norm shift) computes the folder's logits and
    tokenizes as the folder's tokenizer does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = torch.tensor([tokenizer.encode(" ".join(TEXTS))])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(directory).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert (theirs.encode(text, add_special_tokens=False)
                == tokenizer.encode(text, add_special_tokens=False)), text


def test_qwen2_export_reads_back_with_converter_keys_biases_and_chatml_types(qwen2_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "qwen2.gguf"
    result = export_gguf(qwen2_model, out, outtype="f32")
    fields, tensors = _read(out)
    config = json.loads((qwen2_model / "config.json").read_text())
    assert fields["general.architecture"] == "qwen2" and result.architecture == "qwen2"
    keys = _arch_keys(fields, "qwen2")
    assert set(keys) == QWEN2_KEYS
    assert (keys["block_count"], keys["context_length"], keys["embedding_length"]) == (2, 128, 32)
    assert (keys["feed_forward_length"], keys["attention.head_count"],
            keys["attention.head_count_kv"]) == (64, 4, 2)
    assert keys["rope.freq_base"] == 1_000_000.0
    assert keys["attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    # tensors: llama.cpp's qwen2 names, biases kept, q/k not permuted (NeoX rope, as in transformers)
    assert set(tensors) == _expected_tensors("qwen2", 2, tied=False)
    weights = load_file(str(qwen2_model / "model.safetensors"))
    for gguf_name, hf_name in (("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
                               ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
                               ("output.weight", "lm_head.weight")):
        assert torch.equal(_values(tensors[gguf_name]), weights[hf_name]), gguf_name
    assert [int(d) for d in tensors["token_embd.weight"].shape] == [32, config["vocab_size"]]
    # vocabulary: byte-level BPE with Qwen's pre-tokenizer, ChatML markers CONTROL, <im_end> ends a turn
    tokenizer = AutoTokenizer.from_pretrained(qwen2_model)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    kind = dict(zip(tokens, types))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert kind["<|endoftext|>"] == kind["<|im_start|>"] == kind["<|im_end|>"] == CONTROL
    assert kind["<tool_call>"] == USER_DEFINED and types[-4:] == [UNUSED] * 4
    assert set(types[:len(tokenizer)]) == {NORMAL, CONTROL, USER_DEFINED}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"] == fields["tokenizer.ggml.eos_token_id"] == im_end
    assert fields["tokenizer.ggml.add_bos_token"] is False and "tokenizer.ggml.bos_token_id" not in fields
    assert fields["tokenizer.ggml.merges"] and fields["tokenizer.chat_template"] == CHATML
    _same_logits(qwen2_model, out)


def test_gemma3_export_shifts_norms_and_writes_gemma_keys_and_types(gemma3_model, tmp_path):
    out = tmp_path / "gemma3.gguf"
    export_gguf(gemma3_model, out, outtype="f32")
    fields, tensors = _read(out)
    config = json.loads((gemma3_model / "config.json").read_text())
    assert fields["general.architecture"] == "gemma3"
    keys = _arch_keys(fields, "gemma3")
    assert set(keys) == GEMMA3_KEYS  # a 2-layer model is all-local, as llama.cpp's every-6th rule has it
    assert keys["attention.key_length"] == keys["attention.value_length"] == 256
    assert (keys["attention.head_count"], keys["attention.head_count_kv"], keys["block_count"]) == (2, 1, 2)
    assert keys["rope.freq_base"] == 1_000_000.0 and keys["rope.freq_base_swa"] == 10_000.0
    assert keys["attention.sliding_window"] == 16 and keys["context_length"] == 128
    assert set(tensors) == _expected_tensors("gemma3", 2, tied=True)  # tied: no output.weight
    weights = load_file(str(gemma3_model / "model.safetensors"))
    for gguf_name, hf_name in (
            ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
            ("blk.0.post_attention_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
            ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
            ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
            ("output_norm.weight", "model.norm.weight")):
        assert torch.equal(_values(tensors[gguf_name]), weights[hf_name] + 1), gguf_name  # Gemma's 1 + w
    q_proj = weights["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(_values(tensors["blk.0.attn_q.weight"]), q_proj)  # no rotary permutation
    embed = weights["model.embed_tokens.weight"]
    assert torch.equal(_values(tensors["token_embd.weight"]), embed)  # llama.cpp scales by sqrt(hidden)
    # vocabulary: SentencePiece-style with Gemma's control pieces, no prefix space, BOS added
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    kind = dict(zip(tokens, types))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    for control in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<unused0>"):
        assert kind[control] == CONTROL, control
    assert kind["<unk>"] == UNKNOWN and kind["<table>"] == USER_DEFINED and kind["<0x0A>"] == BYTE
    assert types[-5:] == [UNUSED] * 5 and len(tokens) == config["vocab_size"]
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.bos_token_id"] == 2
    assert fields["tokenizer.ggml.eot_token_id"] == tokens.index("<end_of_turn>")
    _same_logits(gemma3_model, out)


def _variant(model, tmp_path, **changes):
    copy = tmp_path / "variant"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_gemma3_other_layer_layout_is_written_per_layer(gemma3_model, tmp_path):
    """llama.cpp assumes every 6th layer is global; another layout goes into `sliding_window_pattern`."""
    model = _variant(gemma3_model, tmp_path, layer_types=["full_attention", "sliding_attention"])
    fields, _ = _read(export_gguf(model, tmp_path / "m.gguf", outtype="f16").path)
    assert [bool(v) for v in fields["gemma3.attention.sliding_window_pattern"]] == [False, True]


@pytest.mark.parametrize("which, changes, message", [
    ("gemma3", {"query_pre_attn_scalar": 128}, "query_pre_attn_scalar 128 differs from 256"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "sets attn_logit_softcapping"),
    ("qwen2", {"use_sliding_window": True}, "Qwen2 sliding-window attention"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     "rope scaling 'yarn' is not supported by export-gguf for qwen2"),
])
def test_what_llama_cpp_would_compute_differently_is_refused(request, tmp_path, which, changes, message):
    model = _variant(request.getfixturevalue(f"{which}_model"), tmp_path, **changes)
    with pytest.raises(TransplantError, match=message) as info:
        export_gguf(model, tmp_path / "m.gguf")
    assert "\n" not in str(info.value) and not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_real_gemma3_matches_the_llama_cpp_converted_gguf(tmp_path):
    """Gemma-3-270M (the cached model folder) against the GGUF llama.cpp's converter made of it (the asset it
    was dequantised from): the same keys and values, tokens, token types, tensor names, shapes and norms."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from transplant.assets import catalog

    directory = catalog.fetch_model("gemma3-270m")
    reference = GGUFReader(catalog.MODELS["gemma3-270m"].gguf_path)
    out = tmp_path / "gemma3-270m.gguf"
    export_gguf(directory, out, outtype="f16")
    fields, tensors = _read(out)
    theirs = {name: field.contents() for name, field in reference.fields.items()}
    assert fields["general.architecture"] == "gemma3"
    for key, value in _arch_keys(theirs, "gemma3").items():
        assert _arch_keys(fields, "gemma3")[key] == pytest.approx(value), key
    for key in ("model", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_bos_token", "add_eos_token", "add_space_prefix", "tokens"):
        assert fields[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    ours_types, their_types = fields["tokenizer.ggml.token_type"], theirs["tokenizer.ggml.token_type"]
    differing = {fields["tokenizer.ggml.tokens"][i] for i, (a, b) in enumerate(zip(ours_types, their_types))
                 if a != b}
    assert differing <= {"<unk>"}  # the converter makes the special <unk> CONTROL; ours stays UNKNOWN
    assert fields["tokenizer.ggml.eot_token_id"] == fields["tokenizer.ggml.tokens"].index("<end_of_turn>")
    assert {t.name: [int(d) for d in t.shape] for t in reference.tensors} == {
        name: [int(d) for d in t.shape] for name, t in tensors.items()}
    for name in ("blk.0.attn_q_norm.weight", "blk.7.post_ffw_norm.weight", "output_norm.weight"):
        reference_norm = next(t for t in reference.tensors if t.name == name)
        expected = dequantize(reference_norm.data, reference_norm.tensor_type)
        assert np.allclose(_values(tensors[name]).numpy(), expected, atol=1e-5), name
