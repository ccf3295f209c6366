"""The bad-input matrix of issue 12, end to end through the command lines on tiny models built here.

Every user error is one line on stderr and exit code 2, with nothing written and nothing lost: each case
snapshots its whole scratch folder (inputs, user files, the output's parent) before the run and compares
after. The cases are the rows of the table in README.md's Errors section. What must work instead (overwriting
an earlier output, honest bits per byte, cleanup after SIGTERM/SIGKILL, permissions, a tampered checkpoint
that does not run) is in tests/test_reliability_outputs.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import distill_main, transplant_main
from transplant.io import atomic, safetensors

CORPUS = "The cat sat on the mat. Tokens are bytes; numbers 12345 stay numbers.\n" * 40


# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, object]:
    """Every path under `root` with its content hash (size and mtime for big or sparse files)."""
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            state[rel] = "dir"
        elif path.stat().st_size < 1 << 20:
            state[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
        else:
            state[rel] = (path.stat().st_size, path.stat().st_mtime_ns)
    return state


def assert_user_error(result, fragment: str) -> str:
    """Exit 2 and one `error:` line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]
    return lines[0]


def copy_model(pair: dict, key: str, dest: Path) -> Path:
    return Path(shutil.copytree(pair[key], dest))


def edit_config(model: Path, **changes) -> Path:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return model


def rewrite_header(path: Path, change: Callable[[dict], object]) -> None:
    """Apply `change` to a safetensors file's parsed header and write it back (bytes of the data
    unchanged)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    raw = change(header)
    raw = raw if isinstance(raw, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def split_in_two_shards(model: Path) -> Path:
    """Re-save `model` as two shards: embeddings in the first, the layers in the second (copied through)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    first = {k: v for k, v in tensors.items() if "embed" in k or "lm_head" in k or k == "model.norm.weight"}
    second = {k: v for k, v in tensors.items() if k not in first}
    (model / "model.safetensors").unlink()
    names = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for name, part in names.items():
        save_file(part, model / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in names.items() for k in part}}
    (model / safetensors.WEIGHT_INDEX).write_text(json.dumps(index))
    return model


def overlap(header: dict) -> None:
    """up_proj's offsets pointed at gate_proj's bytes: the issue's silent `gate_proj == up_proj`."""
    gate = header["model.layers.0.mlp.gate_proj.weight"]["data_offsets"]
    header["model.layers.0.mlp.up_proj.weight"]["data_offsets"] = list(gate)


def write_gguf(path: Path) -> Path:
    """A tiny llama-style (SentencePiece) GGUF vocabulary with byte fallback."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
              + ["▁the", "▁a", "t", "h", "e", "▁"])
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * 6)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def lie_in_gguf(path: Path, key: bytes, extra: int, value: int) -> Path:
    """Overwrite the u64 `extra` bytes after metadata key `key` (a string length or an array count)."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, data.find(key) + len(key) + extra, value)
    path.write_bytes(data)
    return path


def sparse_file(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


def unk_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer that maps almost all text to [UNK]: the issue's flattering donor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3, "the": 4, "a": 5, "cat": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="[UNK]").save_pretrained(directory)
    return directory


def empty_tokenizer(directory: Path) -> Path:
    directory.mkdir()
    model = {"type": "BPE", "vocab": {}, "merges": [], "unk_token": None, "dropout": None,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
             "byte_fallback": False}
    (directory / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None, "model": model}))
    return directory / "tokenizer.json"


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _raise(code: int) -> Callable:
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


# ---------------------------------------------------------------- the matrix


@dataclass
class Ctx:
    """What a case may use: its scratch folder (snapshotted), the tiny models, monkeypatch."""

    tmp: Path
    pair: dict
    monkeypatch: pytest.MonkeyPatch

    def out(self) -> Path:
        return self.tmp / "out"

    def transplant(self, base: Path | None = None, donor: Path | None = None, *extra: object) -> list[object]:
        return ["--base", base or self.pair["base_tied"], "--donor", donor or self.pair["donor_tok"],
                "--method", "fvt", "--eval-bytes", "0", "-o", self.out(), *extra]


def _user_dir(c: Ctx) -> list[object]:
    c.out().mkdir()
    (c.out() / "thesis.tex").write_text("years of work")
    return c.transplant(None, None, "--overwrite")


def _cwd(c: Ctx) -> list[object]:
    (c.tmp / "here").mkdir()
    (c.tmp / "here" / "notes.txt").write_text("mine")
    c.monkeypatch.chdir(c.tmp / "here")
    return [*c.transplant(), "-o", ".", "--overwrite"]


def _donor(c: Ctx) -> list[object]:
    donor = copy_model(c.pair, "donor_tok", c.tmp / "donor")
    return [*c.transplant(None, donor), "-o", donor, "--overwrite"]


def _parent_of_base(c: Ctx) -> list[object]:
    base = copy_model(c.pair, "base_tied", c.tmp / "models" / "base")
    return [*c.transplant(base), "-o", base.parent, "--overwrite"]


def _symlink(c: Ctx) -> list[object]:
    (c.tmp / "real").mkdir()
    c.out().symlink_to(c.tmp / "real")
    return c.transplant(None, None, "--overwrite")


def _under_a_file(c: Ctx) -> list[object]:
    (c.tmp / "file").write_text("x")
    return [*c.transplant(), "-o", c.tmp / "file" / "out"]


def _patched(target, name: str, value) -> Callable[[Ctx], list[object]]:
    def build(c: Ctx) -> list[object]:
        c.monkeypatch.setattr(target, name, value)
        return c.transplant()

    return build


def _base_with(change: Callable[[Path], object]) -> Callable[[Ctx], list[object]]:
    def build(c: Ctx) -> list[object]:
        base = copy_model(c.pair, "base_untied", c.tmp / "base")
        change(base)
        return c.transplant(base)

    return build


def _donor_file(make: Callable[[Path], Path]) -> Callable[[Ctx], list[object]]:
    return lambda c: c.transplant(None, make(c.tmp))


def _omp_set(value: str) -> Callable[[Ctx], list[object]]:
    return lambda c: [*c.transplant(None, c.pair["donor_model"]), "--method", "omp", "--set", value]


def _eval(make_text: Callable[[Ctx], tuple[Path, Path]]) -> Callable[[Ctx], list[object]]:
    def build(c: Ctx) -> list[object]:
        model, text = make_text(c)
        return ["eval", model, "--text", text]

    return build


def _text(c: Ctx, content: bytes, model: Path | None = None) -> tuple[Path, Path]:
    return model or c.pair["base_tied"], write(c.tmp / "t.txt", content)


def _truncated(c: Ctx) -> tuple[Path, Path]:
    model = copy_model(c.pair, "base_tied", c.tmp / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return _text(c, CORPUS.encode(), model)


def _lossy_model(c: Ctx) -> tuple[Path, Path]:
    model = copy_model(c.pair, "base_tied", c.tmp / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    unk_tokenizer(model)
    return _text(c, CORPUS.encode(), model)


def _bad_yaml(c: Ctx) -> list[object]:
    (c.tmp / "heal.yaml").write_text("train: [1, 2\n  steps: }\n")
    return [c.tmp / "heal.yaml"]


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd"
NESTED = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
CASES = {  # name: (build, fragment of the one-line error, command); README's Errors table lists the same rows
    "overwrite a folder of user files": (_user_dir, "not written by tokentransplant", transplant_main),
    "-o . --overwrite": (_cwd, "is the current directory", transplant_main),
    "-o <donor> --overwrite": (_donor, "is an input of this run", transplant_main),
    "-o <parent of base> --overwrite": (_parent_of_base, "contains an input of this run", transplant_main),
    "output is a symlink": (_symlink, "symbolic link", transplant_main),
    "output under a file": (_under_a_file, "is a file, not a directory", transplant_main),
    "output not writable": (_patched(atomic.os, "mkdir", _raise(errno.EACCES)), "Permission denied",
                            transplant_main),
    "not enough free space": (_patched(atomic.shutil, "disk_usage",
                                       lambda p: shutil._ntuple_diskusage(1, 1, 1)),
                              "disk full", transplant_main),
    "EFBIG mid-write (ulimit -f)": (_patched(safetensors, "_copy_range", _raise(errno.EFBIG)), "ulimit -f",
                                    transplant_main),
    "ENOSPC mid-write": (_patched(safetensors, "write_shard", _raise(errno.ENOSPC)),
                         "disk full while writing", transplant_main),
    "shard with overlapping tensors": (_base_with(lambda b: rewrite_header(
        split_in_two_shards(b) / "model-00002-of-00002.safetensors", overlap)), "overlaps", transplant_main),
    "shard with bytes of no tensor": (_base_with(lambda b: (b / "model.safetensors").write_bytes(
        (b / "model.safetensors").read_bytes() + b"\0" * 8)), "belong to no tensor", transplant_main),
    "dtype x shape != bytes": (_base_with(lambda b: rewrite_header(b / "model.safetensors", lambda h: h[
        "model.norm.weight"].update(dtype="F16"))), "bytes for shape", transplant_main),
    "header nested 200k deep": (_base_with(lambda b: rewrite_header(b / "model.safetensors",
                                                                    lambda h: NESTED)),
                                "nested too deeply", transplant_main),
    "truncated shard": (_base_with(lambda b: (b / "model.safetensors").write_bytes(
        (b / "model.safetensors").read_bytes()[:-100])), "truncated", transplant_main),
    "config vocab_size: lots": (_base_with(lambda b: edit_config(b, vocab_size="lots")),
                                "vocab_size must be a positive integer", transplant_main),
    "config hidden_size: -1": (_base_with(lambda b: edit_config(b, hidden_size=-1)),
                               "hidden_size must be a positive integer", transplant_main),
    "config tie_word_embeddings: yes": (_base_with(lambda b: edit_config(b, tie_word_embeddings="yes")),
                                        "tie_word_embeddings must be", transplant_main),
    "empty donor vocabulary": (_donor_file(lambda t: empty_tokenizer(t / "empty")), "empty vocabulary",
                               transplant_main),
    "GGUF string length lies": (_donor_file(lambda t: lie_in_gguf(write_gguf(t / "v.gguf"),
                                                                  b"tokenizer.ggml.model", 4, 2**62)),
                                "not a valid GGUF", transplant_main),
    "GGUF array count lies": (_donor_file(lambda t: lie_in_gguf(write_gguf(t / "v.gguf"),
                                                                b"tokenizer.ggml.scores", 8, 2**40)),
                              "not a valid GGUF", transplant_main),
    "12 GB GGUF donor": (_donor_file(lambda t: sparse_file(t / "big.gguf", b"GGUF", 12 << 30)),
                         "not a valid GGUF", transplant_main),
    "600 MB non-GGUF donor": (_donor_file(lambda t: sparse_file(t / "big.json", b"{", 600 << 20)),
                              "too large for a tokenizer file", transplant_main),
    "corrupt tokenizer.json": (_donor_file(lambda t: write(t / "tokenizer.json", b'{"model": ')),
                               "not valid JSON", transplant_main),
    "--set k=abc": (_omp_set("k=abc"), "k=abc", transplant_main),
    "--set k=-1": (_omp_set("k=-1"), "out of range", transplant_main),
    "--set k=100000000": (_omp_set("k=100000000"), "out of range", transplant_main),
    "--set kk=3 (unknown key)": (_omp_set("kk=3"), "unknown option kk", transplant_main),
    "--device banana": (lambda c: [*c.transplant(), "--device", "banana"], "--device banana",
                        transplant_main),
    "--device cuda on a CPU build": (lambda c: [*c.transplant(), "--device", "cuda"], "--device cuda",
                                     transplant_main),
    "eval: truncated model": (_eval(_truncated), "not a valid safetensors file", transplant_main),
    "eval: empty text": (_eval(lambda c: _text(c, b"")), "empty", transplant_main),
    "eval: binary --text": (_eval(lambda c: _text(c, BINARY)), "UTF-8", transplant_main),
    "eval: tokenizer maps text to [UNK]": (_eval(_lossy_model), "does not reproduce the text",
                                           transplant_main),
    "extend: binary --corpus": (lambda c: ["extend", c.pair["base_tied"], "--corpus", _text(c, BINARY)[1],
                                           "-n", "3", "-o", c.out()], "UTF-8", transplant_main),
    "extend: overwrite a folder of user files": (lambda c: _user_dir(c) and [
        "extend", c.pair["base_tied"], "--token", " catalog", "-o", c.out(), "--overwrite"],
        "not written by tokentransplant", transplant_main),
    "distill: bad YAML": (_bad_yaml, "fix the YAML", distill_main),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_and_changes_nothing(name, tiny_pair, tmp_path, monkeypatch):
    if name == "--device cuda on a CPU build" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    build, fragment, command = CASES[name]
    args = build(Ctx(tmp_path, tiny_pair, monkeypatch))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert_user_error(result, fragment)
    assert snapshot(tmp_path) == before, "a failed run wrote or deleted something"


# ---------------------------------------------------------------- header validation, one rule at a time


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, fragment", [
    (b'{"a": ' + json.dumps(_entry()).encode() + b', "a": ' + json.dumps(_entry()).encode() + b"}", 8,
     "duplicate key"),
    ({"a": _entry(dtype="F7")}, 8, "unknown dtype"),
    ({"a": _entry(shape=(True, 2))}, 8, "bad shape"),
    ({"a": _entry(offsets=(8, 0))}, 8, "bytes for shape"),
    ({"a": {**_entry(), "extra": 1}}, 8, "exactly dtype, shape and data_offsets"),
    ({"a": _entry(), "b": _entry(offsets=(4, 12))}, 12, "overlaps"),
    ({"a": _entry(), "b": _entry(offsets=(12, 20))}, 20, "belong to no tensor"),
    ({"a": _entry()}, 12, "trailing bytes"),
    ({"__metadata__": {"format": 1}, "a": _entry()}, 8, "__metadata__"),
    ([1, 2], 0, "not a JSON object"),
])
def test_header_rules(tmp_path, header, data, fragment):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = write(tmp_path / "x.safetensors", struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    with pytest.raises(safetensors.TransplantError, match=fragment):
        safetensors.read_header(path)


def test_a_tensor_stored_in_two_shards_is_refused(tiny_pair, tmp_path):
    model = split_in_two_shards(copy_model(tiny_pair, "base_tied", tmp_path / "m"))
    first = model / "model-00001-of-00002.safetensors"
    shutil.copy(first, model / "model-00002-of-00002.safetensors")
    with pytest.raises(safetensors.TransplantError, match="stored twice"):
        safetensors.weight_entries(model)
