"""Chat and control tokens survive a transplant: template, markers with their trained rows, --map-token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_chatml_model
from transplant.errors import TransplantError
from transplant.pipeline import transplant
from transplant.tokenizers.control import parse_token_map

MESSAGES = [{"role": "user", "content": "the cat sat on the mat"}]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A tiny instruct-style base: ChatML markers as specials and a ChatML template."""
    return build_chatml_model(tmp_path_factory.mktemp("chat"), seed=3)


def _rows(model_dir: Path) -> torch.Tensor:
    return load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]


def test_markers_carried_with_base_rows_and_chat_works(chat_base, tiny_pair, tmp_path):
    from transformers import AutoTokenizer, pipeline

    out = tmp_path / "out"
    result = transplant(chat_base, tiny_pair["donor_tok"], method="fvt", output=out)
    donor = AutoTokenizer.from_pretrained(tiny_pair["donor_tok"])
    base = AutoTokenizer.from_pretrained(chat_base)
    tok = AutoTokenizer.from_pretrained(out)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert sorted([start, end]) == [len(donor), len(donor) + 1]  # appended; donor ids unchanged
    assert (tok.convert_ids_to_tokens(list(range(len(donor))))
            == donor.convert_ids_to_tokens(list(range(len(donor)))))
    new_rows, base_rows = _rows(out), _rows(chat_base)
    for text, idx in (("<|im_start|>", start), ("<|im_end|>", end)):
        assert torch.equal(new_rows[idx], base_rows[base.convert_tokens_to_ids(text)])
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(start) == 2 and ids.count(end) == 1  # markers are single tokens, never split
    generation = json.loads((out / "generation_config.json").read_text())
    assert end in generation["eos_token_id"]  # the reply stops at <|im_end|>
    chat = result.extra["chat"]
    assert chat.template_source == "base" and chat.carried == ["<|im_end|>", "<|im_start|>"]
    assert json.loads((out / "report.json").read_text())["chat"]["template_source"] == "base"
    generator = pipeline("text-generation", model=str(out), device="cpu")
    reply = generator(MESSAGES, max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


@pytest.mark.parametrize("method", ["omp", "fvt-ls"])
def test_donor_methods_accept_carried_markers(chat_base, tiny_pair, tmp_path, method):
    """Carried markers are appended after the donor's ids, so the donor model has no rows for them; methods
    that read donor rows must not call that a model/tokenizer mismatch (it stopped omp on every chat base)."""
    out = tmp_path / method
    result = transplant(chat_base, tiny_pair["donor_model"], method=method, output=out,
                        options={"k": 4} if method == "omp" else None)
    assert result.extra["chat"].carried == ["<|im_end|>", "<|im_start|>"]
    donor_weights = load_file(str(tiny_pair["donor_model"] / "model.safetensors"))
    donor_rows = donor_weights["model.embed_tokens.weight"].shape[0]
    assert _rows(out).shape[0] == donor_rows + 2


def test_map_token_copies_the_named_base_row(chat_base, tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    transplant(chat_base, tiny_pair["donor_tok"], method="fvt", output=out,
               map_tokens={"<pad>": "<|im_start|>"})
    tok, base = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(chat_base)
    assert torch.equal(_rows(out)[tok.convert_tokens_to_ids("<pad>")],
                       _rows(chat_base)[base.convert_tokens_to_ids("<|im_start|>")])


def test_template_choices(chat_base, tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    none = transplant(chat_base, tiny_pair["donor_tok"], method="fvt", output=tmp_path / "none",
                      chat_template="none")
    assert (none.extra["chat"].carried == []
            and not AutoTokenizer.from_pretrained(tmp_path / "none").chat_template)
    donor = transplant(chat_base, tiny_pair["donor_tok"], method="fvt", output=tmp_path / "d",
                       chat_template="donor")
    assert donor.extra["chat"].template_source == "base"  # the donor has none: the base's is carried
    with pytest.raises(TransplantError, match="no chat template"):
        transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="fvt", output=tmp_path / "b",
                   chat_template="base")


def test_map_token_errors(chat_base, tiny_pair, tmp_path):
    with pytest.raises(TransplantError, match="has no token"):
        transplant(chat_base, tiny_pair["donor_tok"], method="fvt", output=tmp_path / "x",
                   map_tokens={"[INST]": "<|im_start|>"})
    assert not (tmp_path / "x").exists()
    with pytest.raises(TransplantError, match="NEW=BASE"):
        parse_token_map(["nothing"])
    assert parse_token_map(["[INST]=<|im_start|>"]) == {"[INST]": "<|im_start|>"}


@pytest.mark.slow
def test_demo_output_chats(tmp_path):
    """The demo pair: SmolLM2-135M-Instruct with Mistral's tokenizer answers through the chat template."""
    from transformers import AutoTokenizer, pipeline

    out = tmp_path / "demo"
    transplant("smollm2-135m", "mistral-v3", method="fvt", output=out)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>")
    generator = pipeline("text-generation", model=str(out), device="cpu")
    reply = generator(MESSAGES, max_new_tokens=8, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_cli_says_what_it_did_and_refuses_a_bad_map(chat_base, tiny_pair, tmp_path):
    from click.testing import CliRunner

    from cli import transplant_main

    args = ["--base", str(chat_base), "--donor", str(tiny_pair["donor_tok"]), "--method", "fvt",
            "--eval-bytes", "0"]
    ok = CliRunner().invoke(transplant_main,
                            [*args, "-o", str(tmp_path / "o"), "--map-token", "<pad>=<|im_end|>"])
    assert ok.exit_code == 0, ok.output
    assert "chat: chat template from the base; carried control tokens <|im_end|>, <|im_start|>" in ok.output
    assert "mapped <pad><-<|im_end|>" in ok.output
    bad = CliRunner().invoke(transplant_main, [*args, "-o", str(tmp_path / "p"), "--map-token", "oops"])
    assert bad.exit_code == 2 and "NEW=BASE" in bad.output and not (tmp_path / "p").exists()
