"""The README demo on the real reference assets: SmolLM2-135M gets the Mistral v3 tokenizer (fvt)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def transplanted(tmp_path_factory):
    import transplant

    out = tmp_path_factory.mktemp("real") / "smollm2-mistral-v3"
    from transplant.assets import texts

    eval_texts = {"english": texts.heldout("english", n_bytes=4096)}
    return transplant.transplant("smollm2-135m", "mistral-v3", method="fvt", output=out,
                                 eval_texts=eval_texts)


def test_demo_output_loads_generates_and_tokenizes_like_sentencepiece(transplanted):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transplant.assets.catalog import fetch_tokenizer_file

    out = transplanted.output
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    # Mistral v3's 32,768 ids, then the base's two chat control tokens carried as specials (issue 13)
    assert (model.config.vocab_size == 32768 + 2 and model.config.bos_token_id == 1
            and model.config.eos_token_id == 2)
    assert tokenizer.convert_ids_to_tokens([32768, 32769]) == ["<|im_start|>", "<|im_end|>"]
    sp = spm.SentencePieceProcessor(model_file=str(fetch_tokenizer_file("mistral-v3")))
    sample = (pytest.importorskip("pathlib").Path(__file__).parent / "data"
              / "multilingual_sample.txt").read_text()
    assert tokenizer.encode(sample, add_special_tokens=False) == sp.encode(sample)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0][inputs["input_ids"].shape[1]:])
    assert "Paris" in text
    config = json.loads((out / "config.json").read_text())
    assert config["_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    assert "smollm2-135m" in card and "mistral-v3" in card and "fvt" in card
    report = json.loads((out / "report.json").read_text())
    assert report["statistics"]["shared"] > 15000


def test_demo_bits_per_byte_survives(transplanted):
    # measured: 1.12 before; fvt keeps most of it (see bench/RESULTS.md); a broken transplant is > 3
    assert transplanted.bpb_before < 1.4
    assert transplanted.bpb_after < 2.0 * transplanted.bpb_before
    assert torch.isfinite(torch.tensor(transplanted.bpb_after))


def test_demo_chat_ends_turns_with_im_end_and_both_template_paths_agree(transplanted):
    """Issue 25: greedy replies end with the template's `<|im_end|>` (not the donor's `</s>`, whose row no
    longer ties with it), and no BOS the base never saw is added, so string and ids paths give one prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = transplanted.output
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == end
    for question in ("What is the capital of France?", "How many legs does a spider have?", "What is 2+2?"):
        messages = [{"role": "user", "content": question}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert tokenizer(rendered)["input_ids"] == ids
        generated = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):]
        assert generated[-1].item() == end, tokenizer.decode(generated)
