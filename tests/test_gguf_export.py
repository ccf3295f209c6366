"""Issue 13, item 4: GGUF out (`export-gguf`, read back with gguf.GGUFReader and transformers) and GGUF in
(a GGUF base or donor model is dequantized into a cached folder)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import transplant
from cli import transplant_main
from transplant.assets import load_vocab
from transplant.errors import TransplantError
from transplant.io.gguf_export import MARKER_KEY, export_gguf, llama3_rope_factors
from transplant.io.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED

TEXT = "The quick brown fox 12345 def add(a, b):\n\treturn a + b  # café"


def _fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return reader, fields


def _tensor(reader, name):
    from gguf.quants import dequantize

    tensor = next(t for t in reader.tensors if t.name == name)
    values = dequantize(tensor.data, tensor.tensor_type).reshape(int(tensor.shape[-1]), -1)
    return tensor, torch.from_numpy(values.copy())


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny Llama with a SentencePiece-style vocabulary: byte fallback, [INST] control pieces, a user
    piece."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_vocab import train_sentencepiece

    root = tmp_path_factory.mktemp("spm")
    vocab = load_vocab(train_sentencepiece(root / "sp", "plain"))
    directory = root / "model"
    directory.mkdir()
    vocab.save(directory)
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=len(vocab) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=vocab.roles["bos"], eos_token_id=vocab.roles["eos"])  # 8 padded rows
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_byte_level_llama_round_trips_through_gguf_and_transformers(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model.gguf"
    result = export_gguf(tiny_pair["base_untied"], out, outtype="f32")
    reader, fields = _fields(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["base_untied"])
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokens))))
    types = fields["tokenizer.ggml.token_type"]
    assert {tokens[i] for i, t in enumerate(types) if t == CONTROL} == {"<s>", "</s>", "<pad>"}
    assert set(types) == {NORMAL, CONTROL} and result.control_tokens == 3
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.merges"][:3] == [" ".join(m) if isinstance(m, list) else m for m in
                                                   json.loads((tiny_pair["base_untied"] / "tokenizer.json")
                                                              .read_text())["model"]["merges"][:3]]
    assert fields[MARKER_KEY] and fields["general.architecture"] == "llama"
    weights = load_file(str(tiny_pair["base_untied"] / "model.safetensors"))
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("output.weight", "lm_head.weight")):
        assert torch.equal(_tensor(reader, gguf_name)[1], weights[hf_name])
    # transformers reads the file back (undoing the rotary permutation) to the same model and tokenizer
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["base_untied"]).eval()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert torch.allclose(gguf_model(ids).logits, model(ids).logits, atol=1e-5)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert (gguf_tokenizer.encode(TEXT, add_special_tokens=False)
            == tokenizer.encode(TEXT, add_special_tokens=False))


@pytest.mark.parametrize("outtype, qtype, atol", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 2e-2)])
def test_outtypes_store_2d_tensors_so_and_keep_norms_float32(tiny_pair, tmp_path, outtype, qtype, atol):
    out = tmp_path / "model.gguf"
    export_gguf(tiny_pair["base_tied"], out, outtype=outtype)
    reader, _ = _fields(out)
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert names["token_embd.weight"] == qtype and names["blk.0.attn_norm.weight"] == "F32"
    embed = load_file(str(tiny_pair["base_tied"] / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.allclose(_tensor(reader, "token_embd.weight")[1], embed, atol=atol)


def test_sentencepiece_vocab_types_scores_and_padding(spm_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "model.gguf"
    export_gguf(spm_model, out, outtype="f32")
    _, fields = _fields(out)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    kind = dict(zip(tokens, types))
    assert kind["[INST]"] == kind["[/INST]"] == kind["<s>"] == kind["</s>"] == CONTROL  # never NORMAL
    assert kind["<unk>"] == UNKNOWN and kind["<tool>"] == USER_DEFINED and kind["<0x0A>"] == BYTE
    assert Counter(types)[BYTE] == 256 and types[-8:] == [UNUSED] * 8 and tokens[-1].startswith("[PAD")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert (fields["tokenizer.ggml.add_space_prefix"] is True
            and len(fields["tokenizer.ggml.scores"]) == len(tokens))
    # the scores reproduce our merge order: transformers rebuilds the tokenizer from them with the same ids
    ours = AutoTokenizer.from_pretrained(spm_model)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in ("The quick brown fox jumps", "Über straße café naïve", "for i in range(10):\n\tprint(i)"):
        assert (theirs.encode(text, add_special_tokens=False)
                == ours.encode(text, add_special_tokens=False)), text


def test_refusals_are_one_line_and_write_nothing(tiny_pair, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                               n_positions=32)).save_pretrained(gpt2)
    with pytest.raises(TransplantError,
                       match="GPT2LMHeadModel; export-gguf supports LlamaForCausalLM") as info:
        export_gguf(gpt2, tmp_path / "a.gguf")
    assert "\n" not in str(info.value) and not (tmp_path / "a.gguf").exists()
    with pytest.raises(TransplantError, match="inside an input"):
        export_gguf(tiny_pair["base_tied"], tiny_pair["base_tied"] / "model.gguf")
    stranger = tmp_path / "stranger.gguf"
    stranger.write_bytes(b"not ours")
    with pytest.raises(TransplantError, match="--overwrite refused"):
        export_gguf(tiny_pair["base_tied"], stranger, overwrite=True)
    assert stranger.read_bytes() == b"not ours"
    ours = tmp_path / "ours.gguf"
    export_gguf(tiny_pair["base_tied"], ours, outtype="f32")
    with pytest.raises(TransplantError, match="already exists"):
        export_gguf(tiny_pair["base_tied"], ours)
    export_gguf(tiny_pair["base_tied"], ours, outtype="f16", overwrite=True)  # an earlier export: replaced
    assert _fields(ours)[1]["general.file_type"] == 1
    # no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "ours.gguf", "stranger.gguf"]


def test_cli_export_gguf(tiny_pair, tmp_path):
    runner = CliRunner()
    done = runner.invoke(transplant_main, ["export-gguf", str(tiny_pair["base_tied"]), "-o",
                                           str(tmp_path / "m.gguf"), "--outtype", "q8_0"])
    assert done.exit_code == 0, done.output
    assert "q8_0" in done.output and "3 control" in done.output
    refused = runner.invoke(transplant_main,
                            ["export-gguf", str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf")])
    assert refused.exit_code == 2 and refused.output.startswith("error: ") and refused.output.count("\n") == 1


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=scaling)
    default, _ = (ROPE_INIT_FUNCTIONS["default"](config, "cpu") if "default" in ROPE_INIT_FUNCTIONS
                  else (None, None))
    if default is None:
        default = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    expected = (default / scaled).numpy()
    assert np.allclose(llama3_rope_factors(500000.0, 64, scaling), expected, rtol=1e-4)


# ------------------------------------------------------------------------------------------ GGUF in


def test_gguf_base_and_gguf_donor_are_dequantized_into_the_cache(tiny_pair, tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))
    base_gguf = tmp_path / "base" / "base.gguf"
    base_gguf.parent.mkdir()
    export_gguf(tiny_pair["base_untied"], base_gguf, outtype="f32")
    donor_gguf = tmp_path / "donor.gguf"
    export_gguf(tiny_pair["donor_model"], donor_gguf, outtype="q8_0")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        result = transplant.transplant(base_gguf, donor_gguf, method="omp", output=out, eval_texts=None,
                                       options={"k": 4})
    assert any("dequantized" in r.getMessage() for r in caplog.records)
    model = AutoModelForCausalLM.from_pretrained(out)
    donor_tokens = load_vocab(tiny_pair["donor_model"])
    assert model.get_input_embeddings().weight.shape[0] == len(donor_tokens) and result.method == "omp"
    converted = next((tmp_path / "cache" / "gguf" / "models").iterdir())
    original = load_file(str(tiny_pair["base_untied"] / "model.safetensors"))
    assert torch.equal(load_file(str(converted / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"],
                       original["model.layers.0.mlp.up_proj.weight"])
    assert any((tmp_path / "cache" / "gguf" / "embeddings").iterdir())


@pytest.mark.slow
def test_real_transplant_exports_with_control_tokens(tmp_path):
    """SmolLM2 with Mistral v3's tokenizer (fvt) -> GGUF: [INST] is CONTROL, and transformers' reading of the
    f32 file computes the model folder's logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smol-mistral"
    transplant.transplant("smollm2-135m", "mistral-v3", method="fvt", output=out, eval_texts=None)
    gguf_path = tmp_path / "smol-mistral.gguf"
    export_gguf(out, gguf_path, outtype="f32")
    _, fields = _fields(gguf_path)
    kind = dict(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]))
    assert kind["[INST]"] == kind["[/INST]"] == kind["<s>"] == kind["</s>"] == CONTROL
    assert kind["<unk>"] == UNKNOWN and kind["<0x0A>"] == BYTE and fields["tokenizer.ggml.model"] == "llama"
    ids = torch.tensor([[1, 1183, 6333, 1070, 5611, 1117]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name).eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    shutil.rmtree(out)
