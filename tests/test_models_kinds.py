"""Issue 13, item 3: every per-token tensor and token-id field, on a tiny masked LM, untied Llama and Llava.

Each output must load with the stock Auto class of its kind, and every remapped id must name the same token.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import transplant
from tests.conftest import BASE_CORPUS, DONOR_CORPUS, build_byte_bpe
from transplant.assets import load_vocab
from transplant.errors import TransplantError
from transplant.io import token_ids, vocab_tensors
from transplant.tokenizers.align import align
from transplant.tokenizers.segment import segment_with_base


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _copy_tokenizer(src, dst):
    for item in src.iterdir():
        shutil.copy(item, dst / item.name)


# ------------------------------------------------------------------------------------------ pure helpers


def test_sparse_composer_composes_like_rows_and_fills_the_rest_with_the_mean():
    weights = torch.sparse_coo_tensor(torch.tensor([[0, 1, 1], [2, 0, 1]]), torch.tensor([1.0, 0.5, 0.5]),
                                      (3, 4), check_invariants=True).coalesce()
    base = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    out = vocab_tensors.sparse_composer(weights)(base)
    assert out[:, 0].tolist() == [5.0, 2.0, 4.0]  # copy, mean of two pieces, empty row -> mean of all


def test_rebuild_pads_with_the_mean_along_the_vocabulary_axis():
    bias = torch.tensor([[1.0, 2.0, 3.0]])  # [1, V] like final_logits_bias
    identity = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.ones(3), (3, 3),
                                       check_invariants=True)
    out = vocab_tensors.rebuild(bias, 1, vocab_tensors.sparse_composer(identity), 5)
    assert out.tolist() == [[1.0, 2.0, 3.0, 2.0, 2.0]]


def test_token_id_fields_are_remapped_dropped_or_refused():
    ids = token_ids.TokenIdMap({5: 7, 9: 1}, {3: "<image>"})
    config = {"eos_token_id": [9, 5, 4], "sep_token_id": 4, "decoder_start_token_id": 5,
              "text_config": {"pad_token_id": 9, "image_token_index": 5}, "suppress_tokens": [5, 4],
              "bad_words_ids": [[5, 9]]}
    notes: list[str] = []
    token_ids.remap_token_ids(config, ids, {"eos_token_id": 2, "pad_token_id": 0}, notes)
    assert config == {"eos_token_id": [2, 1, 7], "sep_token_id": None, "decoder_start_token_id": 7,
                      "text_config": {"pad_token_id": 0, "image_token_index": 7}, "suppress_tokens": [7]}
    assert any("sep_token_id=4" in n for n in notes) and any("bad_words_ids" in n for n in notes)
    with pytest.raises(TransplantError, match=r"image_token_index=3 \(base token '<image>'\)") as info:
        token_ids.remap_token_ids({"image_token_index": 3}, ids, {}, [])
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ masked LM


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    from transformers import RobertaConfig, RobertaForMaskedLM

    root = tmp_path_factory.mktemp("mlm")
    specials = ["<s>", "</s>", "<mask>", "<pad>"]
    base_tok = build_byte_bpe(root / "base_tok", BASE_CORPUS, 300, specials)
    donor_tok = build_byte_bpe(root / "donor_tok", DONOR_CORPUS + BASE_CORPUS[:300], 340, specials)
    tokenizer = _tokenizer(base_tok)
    models = {}
    for tied in (True, False):
        torch.manual_seed(3)
        config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=4, intermediate_size=64, max_position_embeddings=70,
                               type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               tie_word_embeddings=tied)
        model = RobertaForMaskedLM(config)
        with torch.no_grad():  # a bias of zeros would hide a wrong mapping
            model.lm_head.bias.copy_(torch.randn(len(tokenizer)))
        directory = root / ("tied" if tied else "untied")
        model.save_pretrained(directory)
        _copy_tokenizer(base_tok, directory)
        models[tied] = directory
    return {"tied": models[True], "untied": models[False], "donor_tok": donor_tok}


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_masked_lm_bias_is_rebuilt_and_the_output_loads(roberta, tmp_path, kind):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "out"
    transplant.transplant(roberta[kind], roberta["donor_tok"], method="fvt", output=out,
                          eval_texts={"english": "The cat sat on the mat."})  # not a causal LM: BPB is
                          #                                                     skipped
    base_vocab, new_vocab = load_vocab(roberta[kind]), load_vocab(roberta["donor_tok"])
    model = AutoModelForMaskedLM.from_pretrained(out)  # refuses any size mismatch
    assert model.lm_head.bias.shape == (len(new_vocab),)
    base_bias = load_file(str(roberta[kind] / "model.safetensors"))["lm_head.bias"]
    written = load_file(str(out / "model.safetensors"))
    assert "lm_head.bias" in written and (kind == "tied") == ("lm_head.decoder.weight" not in written)
    if kind == "untied":
        assert written["lm_head.decoder.bias"].shape == (len(new_vocab),)
        assert written["lm_head.decoder.weight"].shape == (len(new_vocab), 32)
    new_bias = model.lm_head.bias.detach()
    alignment = align(base_vocab, new_vocab)
    for new_id, base_id in enumerate(alignment.new_to_base.tolist()):
        if base_id >= 0:  # shared: an exact copy
            assert new_bias[new_id] == base_bias[base_id]
    checked = 0
    for new_id in alignment.unshared_new_ids.tolist():  # new: composed like FVT composes its row
        piece = new_vocab.token_bytes[new_id]
        if piece and not any(ch.isdigit() for ch in piece.decode("utf-8", "replace")):
            pieces = segment_with_base(base_vocab, [piece])[0]
            assert torch.allclose(new_bias[new_id], base_bias[pieces].mean(), atol=1e-5), piece
            checked += 1
    assert checked > 10
    config = json.loads((out / "config.json").read_text())
    assert (config["pad_token_id"] == new_vocab.roles["pad"]
            and config["bos_token_id"] == new_vocab.roles["bos"])
    assert json.loads((out / "report.json").read_text())["bits_per_byte"] == {}  # skipped, not made up


# ------------------------------------------------------------------------------------------ untied Llama


def test_untied_llama_ids_point_at_the_same_tokens(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_pair["base_untied"], base)
    base_tok, donor_tok = _tokenizer(base), _tokenizer(tiny_pair["donor_tok"])
    the = base_tok.convert_tokens_to_ids("Ġthe")
    only_base = next(i for t, i in sorted(base_tok.get_vocab().items(), key=lambda x: x[1])
                     if t not in donor_tok.get_vocab() and i > 3)
    config = json.loads((base / "config.json").read_text())
    config.update(sep_token_id=the, cls_token_id=only_base, eos_token_id=[base_tok.eos_token_id, the])
    (base / "config.json").write_text(json.dumps(config))
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [base_tok.eos_token_id, the],
                                                             "suppress_tokens": [the, only_base]}))
    out = tmp_path / "out"
    transplant.transplant(base, tiny_pair["donor_tok"], method="fvt", output=out, eval_texts=None)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.shape[0] == len(donor_tok) and not model.config.tie_word_embeddings
    new_the, new_eos = donor_tok.convert_tokens_to_ids("Ġthe"), donor_tok.eos_token_id
    written = json.loads((out / "config.json").read_text())
    assert written["sep_token_id"] == new_the and written["cls_token_id"] is None
    assert written["eos_token_id"] == [new_eos, new_the]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [new_eos, new_the] and generation["suppress_tokens"] == [new_the]
    assert _tokenizer(out).convert_ids_to_tokens(written["sep_token_id"]) == "Ġthe"


# ------------------------------------------------------------------------------------------ Llava


def _tiny_llava(directory, tokenizer_dir):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tokenizer = _tokenizer(tokenizer_dir)
    torch.manual_seed(5)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=4,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    _copy_tokenizer(tokenizer_dir, directory)
    CLIPImageProcessor(size={"shortest_edge": 28},
                       crop_size={"height": 28, "width": 28}).save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaProcessor",
                                                                 "image_token": "<image>", "patch_size": 14}))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return directory


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    base_tok = build_byte_bpe(root / "base_tok", BASE_CORPUS, 300, ["<s>", "</s>", "<image>", "<pad>"])
    donor_tok = build_byte_bpe(root / "donor_tok", DONOR_CORPUS + BASE_CORPUS[:300], 340,
                               ["<s>", "</s>", "<unused0>", "<unused1>", "<image>", "<pad>"])
    plain_tok = build_byte_bpe(root / "plain_tok", DONOR_CORPUS, 340, ["<s>", "</s>", "<pad>"])
    return {"base": _tiny_llava(root / "base", base_tok), "donor_tok": donor_tok, "plain_tok": plain_tok}


def test_llava_image_token_and_processor_files_follow(llava, tmp_path):
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    out = tmp_path / "out"
    transplant.transplant(llava["base"], llava["donor_tok"], method="fvt", output=out, eval_texts=None)
    image_id = _tokenizer(llava["donor_tok"]).convert_tokens_to_ids("<image>")
    assert image_id != _tokenizer(llava["base"]).convert_tokens_to_ids("<image>")
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == image_id
    assert config["text_config"]["vocab_size"] == len(_tokenizer(out))
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        assert (out / name).read_bytes() == (llava["base"] / name).read_bytes()
    AutoModelForImageTextToText.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[_tokenizer(out).bos_token_id] + [image_id] * 4 + _tokenizer(out).encode("The cat")])
    with torch.no_grad():  # 4 image tokens for the 4 patch features: the model finds them by the remapped id
        logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28)).logits
    assert logits.shape[-1] == len(_tokenizer(out))


def test_llava_without_the_image_token_is_refused_before_writing(llava, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TransplantError, match=r"image_token_index=\d+ \(base token '<image>'\)") as info:
        transplant.transplant(llava["base"], llava["plain_tok"], method="fvt", output=out, eval_texts=None)
    assert "\n" not in str(info.value) and not out.exists() and not list(tmp_path.iterdir())
