"""Streaming surgery on tiny Llamas built here: the output must load in stock transformers and be exact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transplant.errors import TransplantError
from transplant.io import atomic, safetensors
from transplant.io.surgery import read_embeddings, write_transplanted

HIDDEN, BASE_VOCAB, NEW_VOCAB = 32, 100, 137


def tiny_llama(directory: Path, *, tied: bool, shard_size: str | None = None, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    (directory / "LICENSE").write_text("licence text")
    (directory / "tokenizer.json").write_text("{}")  # a base tokenizer file that must NOT reach the output
    return directory


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


def write_marker(directory: Path) -> None:
    (directory / "tokenizer_marker.txt").write_text("tokenizer goes here")


def transplant(base: Path, out: Path, *, untie: bool | None = None, seed: int = 1, **kwargs):
    """Run both halves with random new matrices; `untie` None keeps the base's tying."""
    emb = read_embeddings(base)
    gen = torch.Generator().manual_seed(seed)
    new_input = torch.randn(NEW_VOCAB, HIDDEN, generator=gen)
    want_output = (not emb.tied) if untie is None else untie
    new_output = torch.randn(NEW_VOCAB, HIDDEN, generator=gen) if want_output else None
    kwargs.setdefault("special_ids", {"bos": 5, "eos": 6, "pad": None})
    path = write_transplanted(base, out, new_input=new_input, new_output=new_output,
                              save_tokenizer=write_marker,
                              model_card="# card\n", **kwargs)
    return emb, new_input, new_output, path


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")
                and (".tmp-" in p.name or ".old-" in p.name)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "tied": tiny_llama(root / "tied", tied=True),
        "untied": tiny_llama(root / "untied", tied=False, seed=3),
        "sharded": tiny_llama(root / "sharded", tied=False, shard_size="20KB", seed=4),
    }


def test_read_embeddings_tied_and_untied(bases):
    from transformers import AutoModelForCausalLM

    tied = read_embeddings(bases["tied"])
    assert tied.tied and tied.output is None and tied.output_name is None
    assert tied.input_name == "model.embed_tokens.weight" and tied.input.shape == (BASE_VOCAB, HIDDEN)
    assert tied.dtype == torch.float32 and tied.config["vocab_size"] == BASE_VOCAB
    untied = read_embeddings(bases["untied"])
    model = AutoModelForCausalLM.from_pretrained(bases["untied"])
    assert not untied.tied and untied.output_name == "lm_head.weight"
    assert torch.equal(untied.input, model.model.embed_tokens.weight)
    assert torch.equal(untied.output, model.lm_head.weight)


@pytest.mark.parametrize("kind,untie", [("tied", None), ("untied", None), ("tied", True), ("untied", False),
                                        ("sharded", None)])
def test_transplant_loads_in_transformers(bases, tmp_path, kind, untie):
    from transformers import AutoModelForCausalLM

    base = bases[kind]
    _, new_input, new_output, out = transplant(base, tmp_path / "out", untie=untie)
    model = AutoModelForCausalLM.from_pretrained(out)
    tied_out = new_output is None
    assert model.config.vocab_size == NEW_VOCAB and model.config.tie_word_embeddings is tied_out
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (5, 6, None)
    assert torch.equal(model.model.embed_tokens.weight, new_input)
    expected_output = new_input if tied_out else new_output
    assert torch.equal(model.lm_head.weight, expected_output)
    written = all_tensors(out)
    assert ("lm_head.weight" in written) is not tied_out
    for name, tensor in all_tensors(base).items():  # every other tensor bit-identical
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(written[name], tensor) and written[name].dtype == tensor.dtype, name
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.items())
    ids = torch.tensor([[5, 17, 136, 40]])
    assert model(ids).logits.shape == (1, 4, NEW_VOCAB)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 4 and int(generated.max()) < NEW_VOCAB
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"] == 5 and generation["eos_token_id"] == 6
            and generation["pad_token_id"] is None)
    assert (out / "README.md").read_text() == "# card\n" and (out / "LICENSE").exists()
    assert (out / "tokenizer_marker.txt").exists() and not (out / "tokenizer.json").exists()
    assert no_leftovers(tmp_path)


def test_sharded_base_keeps_shards(bases, tmp_path):
    base = bases["sharded"]
    assert (base / "model.safetensors.index.json").exists()
    _, _, _, out = transplant(base, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert set(index["weight_map"]) == set(all_tensors(out))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in all_tensors(out).values())
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}


def test_padding_and_dtype_cast(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    _, new_input, new_output, out = transplant(bases["untied"], tmp_path / "out", pad_to_multiple_of=64,
                                               dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 192 and config["dtype"] == "bfloat16"
    written = all_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    emb, head = written["model.embed_tokens.weight"], written["lm_head.weight"]
    assert emb.shape == head.shape == (192, HIDDEN)
    assert (torch.equal(emb[:NEW_VOCAB], new_input.bfloat16())
            and torch.equal(head[:NEW_VOCAB], new_output.bfloat16()))
    for written_matrix, given in ((emb, new_input), (head, new_output)):  # padded rows = mean row
        mean_row = given.bfloat16().float().mean(0).bfloat16()
        assert torch.equal(written_matrix[NEW_VOCAB:], mean_row.expand(192 - NEW_VOCAB, -1))
    base = all_tensors(bases["untied"])
    assert torch.equal(written["model.norm.weight"], base["model.norm.weight"].bfloat16())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 192


def test_padded_ids_never_beat_the_average_token(bases, tmp_path):
    """The mean output row scores the mean real logit, so each padded id gets at most 1/V (Jensen)."""
    from transformers import AutoModelForCausalLM

    _, _, _, out = transplant(bases["untied"], tmp_path / "out", pad_to_multiple_of=64)
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.randint(0, NEW_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))).logits
    real_lse = torch.logsumexp(logits[..., :NEW_VOCAB], -1, keepdim=True)
    assert logits.shape[-1] == 192
    assert ((logits[..., NEW_VOCAB:] - real_lse).exp() <= 1.0001 / NEW_VOCAB).all()


def test_multimodal_style_nested_config(tmp_path):
    base = tmp_path / "mm"
    base.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({"model.language_model.embed_tokens.weight": torch.randn(50, 8, generator=gen),
               "model.language_model.norm.weight": torch.ones(8),
               "model.vision_tower.patch_embed.weight": torch.randn(50, 8, generator=gen)},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "mm", "image_token_index": 49,
                                                  "text_config": {"vocab_size": 50, "eos_token_id": 1}}))
    emb = read_embeddings(base)
    assert emb.input_name == "model.language_model.embed_tokens.weight" and emb.tied
    out = write_transplanted(base, tmp_path / "out", new_input=torch.zeros(70, 8), new_output=None,
                             save_tokenizer=write_marker, special_ids={"eos": 3, "image_token_index": 69},
                             model_card="card")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 70 and config["text_config"]["eos_token_id"] == 3
    assert config["image_token_index"] == 69 and config["tie_word_embeddings"] is True
    written = all_tensors(out)
    assert written["model.language_model.embed_tokens.weight"].shape == (70, 8)
    assert written["model.vision_tower.patch_embed.weight"].shape == (50, 8)


def test_fallback_finds_embedding_by_vocab_rows(tmp_path):
    save_file({"blocks.0.w": torch.ones(4, 4), "my_token_table.weight": torch.ones(30, 4)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 30}))
    emb = read_embeddings(tmp_path)
    assert emb.input_name == "my_token_table.weight" and emb.tied


def test_existing_output_needs_overwrite_and_only_replaces_our_own(bases, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(TransplantError, match="--overwrite"):
        transplant(bases["tied"], out)
    with pytest.raises(TransplantError, match="not written by tokentransplant"):
        transplant(bases["tied"], out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old" and no_leftovers(tmp_path)
    (out / "keep.txt").unlink()  # an empty folder may be replaced, and so may an earlier output
    transplant(bases["tied"], out, overwrite=True)
    first = json.loads((out / atomic.MARKER).read_text())
    assert "model.safetensors" in first["files"] and "config.json" in first["files"]
    transplant(bases["tied"], out, overwrite=True, seed=2)
    assert (out / "config.json").exists() and no_leftovers(tmp_path)
    (out / "notes.md").write_text("mine")  # the user added a file: the output is no longer only ours
    with pytest.raises(TransplantError, match=r"did not write \(notes.md\)"):
        transplant(bases["tied"], out, overwrite=True)
    assert (out / "notes.md").exists()


def test_output_may_not_replace_base(bases, tmp_path):
    base = shutil.copytree(bases["tied"], tmp_path / "base")
    with pytest.raises(TransplantError, match="is an input of this run"):
        transplant(base, base, overwrite=True)
    with pytest.raises(TransplantError, match="contains an input of this run"):
        transplant(base, tmp_path, overwrite=True)
    assert (base / "model.safetensors").exists()


def test_unwritable_destinations(bases, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(TransplantError, match="--output"):
        transplant(bases["tied"], blocker / "out")
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(TransplantError, match="--output"):
                transplant(bases["tied"], locked / "out")
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o700)


def test_permission_denied_on_parent(bases, tmp_path, monkeypatch):
    """What chmod 500 gives a normal user (root, as in CI containers, ignores the mode bits)."""

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.os, "mkdir", denied)
    with pytest.raises(TransplantError, match="cannot write into .*Permission denied.*--output"):
        transplant(bases["tied"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_real_tokenizer_round_trip(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    donor = AutoTokenizer.from_pretrained(tiny_pair["donor_tok"])
    emb = read_embeddings(tiny_pair["base_untied"])
    rows = len(donor)
    new_input = emb.input.mean(0, keepdim=True).repeat(rows, 1) + 0.01 * torch.randn(rows, emb.input.shape[1])
    out = write_transplanted(tiny_pair["base_untied"], tmp_path / "out", new_input=new_input, new_output=None,
                             save_tokenizer=donor.save_pretrained, model_card="card",
                             special_ids={"bos": donor.bos_token_id, "eos": donor.eos_token_id,
                                          "pad": donor.pad_token_id}, pad_to_multiple_of=8)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.get_vocab() == donor.get_vocab() and model.config.vocab_size % 8 == 0
    assert model.config.pad_token_id == donor.pad_token_id and model.config.tie_word_embeddings
    batch = tokenizer(["the cat sat", "über"], return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert isinstance(tokenizer.batch_decode(generated)[0], str)


def test_copy_fallback_without_copy_file_range(bases, tmp_path, monkeypatch):
    """Filesystems (or platforms) that refuse the in-kernel copy get the buffered copy, bit-identical."""

    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(safetensors.os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(safetensors, "COPY_BUFFER_BYTES", 1000)  # several chunks per tensor
    _, _, _, out = transplant(bases["sharded"], tmp_path / "out")
    written, base = all_tensors(out), all_tensors(bases["sharded"])
    for name in base.keys() - {"model.embed_tokens.weight", "lm_head.weight"}:
        assert torch.equal(written[name], base[name]), name


def test_disk_full_cleans_up(bases, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors, "write_shard", full)
    with pytest.raises(TransplantError,
                       match="disk full while writing .*free space or choose another --output"):
        transplant(bases["untied"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_disk_full_midway_through_a_shard(bases, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = safetensors._copy_range

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(safetensors, "_copy_range", flaky)
    with pytest.raises(TransplantError, match="disk full"):
        transplant(bases["sharded"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tokenizer_failure_cleans_up(bases, tmp_path):
    def broken(directory: Path) -> None:
        (directory / "half.json").write_text("{")
        raise RuntimeError("tokenizer bug")

    with pytest.raises(RuntimeError, match="tokenizer bug"):
        write_transplanted(bases["tied"], tmp_path / "out", new_input=torch.zeros(10, HIDDEN),
                           new_output=None, save_tokenizer=broken, special_ids={}, model_card="")
    assert list(tmp_path.iterdir()) == []


def corrupt_copy(bases, tmp_path, how: str) -> Path:
    base = shutil.copytree(bases["untied"], tmp_path / f"base_{how}")
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage_header":
        weights.write_bytes(struct.pack("<Q", 40) + b"\x00not json at all, just bytes!!!!!!!!!!" + data[48:])
    elif how == "huge_length":
        weights.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif how == "tiny":
        weights.write_bytes(b"abc")
    return base


@pytest.mark.parametrize("how", ["truncated", "garbage_header", "huge_length", "tiny"])
def test_corrupt_safetensors(bases, tmp_path, how):
    base = corrupt_copy(bases, tmp_path, how)
    with pytest.raises(TransplantError, match="not a valid safetensors file"):
        read_embeddings(base)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(TransplantError, match="not a valid safetensors file"):
        write_transplanted(base, out_parent / "out", new_input=torch.zeros(10, HIDDEN), new_output=None,
                           save_tokenizer=write_marker, special_ids={}, model_card="")
    assert list(out_parent.iterdir()) == []


def test_missing_config_and_missing_dir(bases, tmp_path):
    base = shutil.copytree(bases["tied"], tmp_path / "base")
    (base / "config.json").unlink()
    with pytest.raises(TransplantError, match="no config.json"):
        read_embeddings(base)
    with pytest.raises(TransplantError, match="does not exist"):
        read_embeddings(tmp_path / "nowhere")


def test_base_without_embeddings(tmp_path):
    save_file({"layers.0.mlp.weight": torch.ones(8, 4), "norm.weight": torch.ones(4)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50}))
    with pytest.raises(TransplantError, match="no embedding tensor"):
        read_embeddings(tmp_path)


def test_only_pytorch_bin(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TransplantError, match="only safetensors are read.*save_pretrained"):
        read_embeddings(tmp_path)


def test_missing_shard_in_index(bases, tmp_path):
    base = shutil.copytree(bases["sharded"], tmp_path / "base")
    next(base.glob("model-*.safetensors")).unlink()
    with pytest.raises(TransplantError, match="missing shard"):
        read_embeddings(base)


def test_bad_matrices_are_rejected_before_writing(bases, tmp_path):
    with pytest.raises(ValueError, match="new_input"):
        write_transplanted(bases["tied"], tmp_path / "out", new_input=torch.zeros(10, HIDDEN + 1),
                           new_output=None, save_tokenizer=write_marker, special_ids={}, model_card="")
    with pytest.raises(ValueError, match="NaN or inf"):
        write_transplanted(bases["tied"], tmp_path / "out", new_input=torch.full((10, HIDDEN), 1e6),
                           new_output=None, save_tokenizer=write_marker, special_ids={}, model_card="",
                           dtype=torch.float16)
    with pytest.raises(ValueError, match="outside the new vocabulary"):
        write_transplanted(bases["tied"], tmp_path / "out", new_input=torch.zeros(10, HIDDEN),
                           new_output=None, save_tokenizer=write_marker, special_ids={"eos": 10},
                           model_card="")
    assert list(tmp_path.iterdir()) == []


def test_extra_files_and_stale_generation_keys(bases, tmp_path):
    base = shutil.copytree(bases["tied"], tmp_path / "base")
    generation = json.loads((base / "generation_config.json").read_text())
    generation.update({"forced_bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.7})
    (base / "generation_config.json").write_text(json.dumps(generation))
    _, _, _, out = transplant(base, tmp_path / "out",
                              extra_files={"report.json": '{"ok": true}', "sub/x.bin": b"\x01"})
    assert (json.loads((out / "report.json").read_text()) == {"ok": True}
            and (out / "sub/x.bin").read_bytes() == b"\x01")
    new_generation = json.loads((out / "generation_config.json").read_text())
    assert "forced_bos_token_id" not in new_generation and new_generation["eos_token_id"] == 6
    assert new_generation["temperature"] == 0.7
