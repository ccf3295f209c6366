"""Chat exact to the token (issue 25): a reply ends with the template's own end-of-turn token, and a prompt
gets the same ids whether rendered to a string first or tokenized by the template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_chatml_model
from transplant.pipeline import transplant

MESSAGES = [{"role": "user", "content": "the cat sat on the mat"}]


def _rows(model_dir: Path) -> torch.Tensor:
    return load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]


def _adding_bos(tokenizer_dir: Path, out: Path) -> Path:
    """A copy of `tokenizer_dir` whose tokenizer.json puts its `<s>` before every text (as Mistral's does)."""
    shutil.copytree(tokenizer_dir, out)
    data = json.loads((out / "tokenizer.json").read_text())
    bos_id = next(t["id"] for t in data["added_tokens"] if t["content"] == "<s>")
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos_id], "tokens": ["<s>"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def _template_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def chat_out(tmp_path_factory, tiny_pair) -> dict[str, Path]:
    """A ChatML base whose eos IS `<|im_end|>` (as SmolLM2) given a donor that adds `<s>` and has `</s>`."""
    root = tmp_path_factory.mktemp("exact")
    base = build_chatml_model(root / "base", seed=5)
    donor = _adding_bos(tiny_pair["donor_tok"], root / "donor_tok")
    out = root / "out"
    transplant(base, donor, method="fvt", output=out)
    return {"base": base, "donor": donor, "out": out}


def test_donor_eos_does_not_tie_with_the_carried_end_of_turn(chat_out):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(chat_out["base"])
    out = AutoTokenizer.from_pretrained(chat_out["out"])
    new_rows, base_rows = _rows(chat_out["out"]), _rows(chat_out["base"])
    end, eos = out.convert_tokens_to_ids(["<|im_end|>", "</s>"])
    assert torch.equal(new_rows[end], base_rows[base.convert_tokens_to_ids("<|im_end|>")])
    # the donor's end of document takes the base's other end of document, not the end-of-turn row
    assert torch.equal(new_rows[eos], base_rows[base.convert_tokens_to_ids("<|endoftext|>")])
    specials = [out.convert_tokens_to_ids(t) for t in out.all_special_tokens]
    for idx in specials:
        if idx != end:
            assert not torch.equal(new_rows[idx], new_rows[end]), out.convert_ids_to_tokens(idx)
    generation = json.loads((chat_out["out"] / "generation_config.json").read_text())
    assert generation["eos_token_id"][:2] == [end, eos]  # the template's end of turn first


def test_bos_follows_the_base_so_string_and_ids_paths_agree(chat_out):
    from transformers import AutoTokenizer

    donor = AutoTokenizer.from_pretrained(chat_out["donor"])
    assert donor("a")["input_ids"][0] == donor.convert_tokens_to_ids("<s>")  # the donor adds a BOS
    tok = AutoTokenizer.from_pretrained(chat_out["out"])
    assert tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # the base adds none
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert tok(rendered)["input_ids"] == _template_ids(tok, MESSAGES)


def test_a_base_that_adds_bos_keeps_adding_it(tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_pair["base_tied"], base)
    _adding_bos(tiny_pair["base_tok"], tmp_path / "base_tok")
    shutil.copy(tmp_path / "base_tok" / "tokenizer.json", base / "tokenizer.json")
    out = tmp_path / "out"
    transplant(base, tiny_pair["donor_tok"], method="fvt", output=out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("a")["input_ids"] == [tok.convert_tokens_to_ids("<s>"), *tok("a", add_special_tokens=False)[
        "input_ids"]]
