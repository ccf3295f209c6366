"""What an output says about where it came from and how long its context is (issue 25): tokenizer_config's
`model_max_length` is the base's context; the card names base and donor by hub id where known, with the
fields the Hub reads (`base_model_relation`, `pipeline_tag`)."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from transplant.eval.card import hub_donor_id, model_card
from transplant.pipeline import transplant


def test_model_max_length_is_the_base_context(tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="fvt", output=out)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 256
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 256
    assert len(tokenizer("word " * 400, truncation=True)["input_ids"]) == 256
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-generation"


def test_card_names_base_and_donor_by_hub_id(tiny_pair):
    card = ModelCard(model_card(base="smollm2-135m", donor="mistral-v3", method="fvt", stats={"new": 1},
                                options={}, base_dir=tiny_pair["base_tied"]))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "finetune" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation"
    meta = card.data.to_dict()["tokentransplant"]
    assert meta["donor_hub_id"] == "mistralai/Mistral-7B-Instruct-v0.3" and meta["donor"] == "mistral-v3"
    assert "`mistralai/Mistral-7B-Instruct-v0.3`" in card.text
    assert (hub_donor_id("llama") == "meta-llama/Llama-3.2-1B"
            and hub_donor_id(str(tiny_pair["donor_tok"])) is None)


def test_config_names_the_base_by_hub_id_not_by_a_gguf_internal_name(tiny_pair, tmp_path):
    from transplant.io.model_config import updated_config

    config = {"model_type": "llama", "vocab_size": 10, "_name_or_path": "/tmp/some/cache/dir",
              "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2"}
    named = updated_config(config, vocab_size=12, ids={}, tied=True, dtype=None,
                           name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert named["_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "_model_name_or_path" not in named
    unknown = updated_config(config, vocab_size=12, ids={}, tied=True, dtype=None)
    assert "_name_or_path" not in unknown and "_model_name_or_path" not in unknown
    out = tmp_path / "out"  # a local base has no hub id: the field is left out rather than a local path
    transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="fvt", output=out)
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())
