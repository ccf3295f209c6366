"""Output metadata: a Hub model card with base_model/tags/license, the family tokenizer class, report.png."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from transplant.pipeline import transplant
from transplant.tokenizers.family import FAMILY_FAST_CLASSES, GENERIC_CLASS, saved_class
from transplant.tokenizers.load import load_vocab

# The fast family classes transformers 4.x ships (as `<name>Fast`, chosen by AutoTokenizer for `<name>`): a
# fixed list, since 4.x is not installed next to 5.x here.
TRANSFORMERS_4_FAST = {"LlamaTokenizerFast", "CodeLlamaTokenizerFast", "GemmaTokenizerFast",
                       "GPT2TokenizerFast", "Qwen2TokenizerFast", "GPTNeoXTokenizerFast",
                       "BloomTokenizerFast", "CohereTokenizerFast", "PreTrainedTokenizerFast"}
TEXTS = ["Hello world", "def add(a, b):\n    return a + b", " the cat  sat", "café 123"]


def _donor_with_class(src: Path, dest: Path, class_name: str) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = class_name
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def test_model_card_metadata(tiny_pair, tmp_path):
    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    shutil.copytree(tiny_pair["base_tied"], base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    out = tmp_path / "out"
    transplant(base, tiny_pair["donor_tok"], method="fvt", output=out, options={"numbers": False})
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit"
    assert "tokentransplant" in card.data.tags and "tokentransplant-fvt" in card.data.tags
    meta = card.data.to_dict()["tokentransplant"]
    assert meta["method"] == "fvt" and meta["options"]["numbers"] is False
    assert card.data.base_model is None  # a local folder is no Hub id
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # fvt has no donor model, still a
    #                                                                       plot


def test_hub_base_model_and_catalog_license():
    from transplant.eval.card import base_license, hub_base_model

    assert hub_base_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_license("smollm2-135m", None) == "apache-2.0"


@pytest.mark.parametrize("declared", ["GPT2TokenizerFast", "WeirdTokenizer", "PreTrainedTokenizerFast"])
def test_saved_class_loads_with_same_ids(tiny_pair, tmp_path, declared, caplog):
    from transformers import AutoTokenizer

    donor = _donor_with_class(tiny_pair["donor_tok"], tmp_path / "donor", declared)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="transplant.tokenizers.vocab"):
        transplant(tiny_pair["base_tied"], donor, method="fvt", output=out)
    saved = json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert saved in FAMILY_FAST_CLASSES | {GENERIC_CLASS}
    assert (saved if saved == GENERIC_CLASS else saved + "Fast") in TRANSFORMERS_4_FAST
    if declared == "GPT2TokenizerFast":
        assert saved == "GPT2Tokenizer"  # the family class is kept: it loads back with the same ids
    else:
        assert saved == GENERIC_CLASS and "tokenizer_config.json names PreTrainedTokenizerFast" in caplog.text
    loaded, vocab = AutoTokenizer.from_pretrained(out), load_vocab(out)
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == vocab.encode(text), text


def test_saved_class_reasons():
    assert saved_class("LlamaTokenizer") == ("LlamaTokenizer", "the donor's own family class LlamaTokenizer")
    assert saved_class(None)[0] == GENERIC_CLASS
    assert "not a fast family class" in saved_class("T5Tokenizer")[1]


def test_report_plot_counts_pieces():

    from transplant.eval.plots import pieces_per_token, render_report_plot
    from transplant.init.base import InitPlan, sparse_rows

    weights = sparse_rows([0, 1, 1, 2], [0, 1, 2, 0], [1.0] * 4, (3, 3))
    plan = InitPlan(weights)
    assert pieces_per_token(plan, [1, 2]).tolist() == [2, 1]
    pytest.importorskip("matplotlib")
    assert render_report_plot(plan, [1, 2])[:4] == b"\x89PNG"
