"""export-gguf writes where the model came from (`general.*`) and the template's end-of-turn token (issue 25),
read back with gguf's own reader."""

from __future__ import annotations

import shutil

from gguf import GGUFReader

from transplant.eval.card import model_card
from transplant.io.gguf_export import export_gguf
from transplant.io.gguf_meta import turn_end_ids


def _value(reader: GGUFReader, key: str):
    field = reader.fields[key]
    raw = field.parts[field.data[0]]
    return bytes(raw).decode() if field.types[0].name == "STRING" else raw[0]


def test_general_metadata_from_the_card(tiny_pair, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pair["base_tied"], model)
    (model / "README.md").write_text(model_card(base="smollm2-135m", donor="mistral-v3", method="fvt",
                                                stats={}, options={}, base_dir=model))
    reader = GGUFReader(export_gguf(model, tmp_path / "m.gguf", outtype="f32").path)
    name = _value(reader, "general.name")
    assert name == "SmolLM2-135M-Instruct with the Mistral-7B-Instruct-v0.3 tokenizer"
    assert _value(reader, "general.base_model.count") == 1
    assert _value(reader, "general.base_model.0.organization") == "HuggingFaceTB"
    assert _value(reader, "general.base_model.0.repo_url") == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _value(reader, "general.license") == "apache-2.0"
    assert "general.tags" in reader.fields


def test_end_of_turn_is_the_templates_marker():
    tokens = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eom_id|>"]
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    assert turn_end_ids(tokens, template) == (3, None)
    assert turn_end_ids(tokens, template + "<|eom_id|>") == (3, 4)
    # no known marker: llama.cpp decides as before
    assert turn_end_ids(tokens, "[INST] {{ x }} [/INST]") == (None, None)
    assert turn_end_ids(tokens, None) == (None, None)
