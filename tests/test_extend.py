"""Issue 13, item 2: `extend --special` adds never-split tokens; a `--token` merges cannot make whole is an
error."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import transplant
from cli import transplant_main
from transplant.errors import TransplantError

TOOL = "<|tool_call|>"


def _stock(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_a_token_the_pre_tokenizer_cuts_is_an_error_not_a_partial_result(tiny_pair, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TransplantError, match=r"would still be split into \d+ tokens") as info:
        transplant.extend_vocab(tiny_pair["base_tied"], new_tokens=[TOOL], output=out)
    message = str(info.value)
    assert "\n" not in message and f"--special {TOOL!r}" in message
    assert not out.exists()


def test_special_token_is_one_id_in_the_written_tokenizer(tiny_pair, tmp_path):
    out = tmp_path / "out"
    result = transplant.extend_vocab(tiny_pair["base_untied"], special_tokens=[TOOL], output=out)
    assert result.extra["added_tokens"] == [TOOL]
    model, tokenizer = _stock(out)  # stock transformers on the output
    base_model, base_tokenizer = _stock(tiny_pair["base_untied"])
    new_id = tokenizer.convert_tokens_to_ids(TOOL)
    assert new_id == len(base_tokenizer) and len(tokenizer) == len(base_tokenizer) + 1
    assert tokenizer.encode(TOOL, add_special_tokens=False) == [new_id]
    text = f"call{TOOL}{{'name': 'x'}} and the cat"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert (ids.count(new_id) == 1 and tokenizer.decode(ids, skip_special_tokens=True)
            == text.replace(TOOL, ""))
    # every existing id is unchanged, so is every existing row; the new rows are finite and not copies of a
    # token
    assert (tokenizer.encode("the cat sat", add_special_tokens=False)
            == base_tokenizer.encode("the cat sat", add_special_tokens=False))
    for new, old in ((model.get_input_embeddings(), base_model.get_input_embeddings()),
                     (model.get_output_embeddings(), base_model.get_output_embeddings())):
        assert torch.equal(new.weight[: len(base_tokenizer)], old.weight)
        assert torch.isfinite(new.weight[new_id]).all()
    added = {t["content"]: t for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert added[TOOL]["special"] is True


def test_special_and_merged_tokens_together(tiny_pair, tmp_path):
    out = tmp_path / "out"
    result = transplant.extend_vocab(tiny_pair["base_tied"], new_tokens=[" catalogue"], special_tokens=[TOOL],
                                     output=out)
    _, tokenizer = _stock(out)
    assert TOOL in result.extra["added_tokens"]
    assert len(tokenizer.encode(" catalogue", add_special_tokens=False)) == 1
    assert len(tokenizer.encode(TOOL, add_special_tokens=False)) == 1


def test_existing_specials_are_kept_and_normal_tokens_are_not_promoted(tiny_pair, tmp_path):
    with pytest.raises(TransplantError, match="no tokens to add"):  # "<s>" is special already
        transplant.extend_vocab(tiny_pair["base_tied"], special_tokens=["<s>"], output=tmp_path / "a")
    with pytest.raises(TransplantError, match="already token .* as a normal token"):
        transplant.extend_vocab(tiny_pair["base_tied"], special_tokens=["Ġthe"], output=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_special_and_token_errors(tiny_pair, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    done = runner.invoke(transplant_main,
                         ["extend", str(tiny_pair["base_tied"]), "--special", TOOL, "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert TOOL in done.output and (out / "config.json").exists()
    refused = runner.invoke(transplant_main, ["extend", str(tiny_pair["base_tied"]), "--token", TOOL, "-o",
                                              str(tmp_path / "no")])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "--special" in refused.output
    assert not (tmp_path / "no").exists()
