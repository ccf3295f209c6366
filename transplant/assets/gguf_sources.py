"""A GGUF file as a base or donor: dequantized once into a cached folder the rest of the project reads.

* Base: the whole model is dequantized through `transplant.assets.gguf.convert_gguf` (transformers' GGUF
  loader, then a plain safetensors folder checked to give the same logits), with our own tokenizer reading of
  the file (`transplant.tokenizers.load`, exact for SentencePiece-style vocabularies). Stored float32: the
  dequantized values are what the quantized model computes with; the quantization error stays in them.
* Donor model (donor methods need its embeddings): only `token_embd` (and `output`, when untied) are read and
  dequantized with the `gguf` package, any architecture, without loading the rest of the model.

Both are cached by the file's content hash under `cache_dir()/gguf/`, so the minutes a large base takes are
paid once. The note that the weights were dequantized is logged at WARNING: the user should know the base's
quality is that of the quantized file, not of the original model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from transplant.cache import cache_dir
from transplant.errors import TransplantError

log = logging.getLogger(__name__)

TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"


def is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic (read 4 bytes: a GGUF can be many GB)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def single_gguf(path: Path) -> Path | None:
    """`path` itself when it is a GGUF file; the only .gguf of a folder without safetensors; else None."""
    if path.is_file():
        return path if is_gguf(path) else None
    if path.is_dir() and not any(path.glob("*.safetensors")):
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1 and is_gguf(found[0]):
            return found[0]
    return None


def _content_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:16]}"


FLOAT_TYPES = {"F32", "F16", "BF16"}  # widened to float32 exactly


def stored_types(path: Path) -> tuple[str | None, list[str]]:
    """(the file type the GGUF declares, e.g. "Q4_K_M", or None; its tensor types, most elements first)."""
    from collections import Counter

    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    sizes: Counter[str] = Counter()
    for tensor in reader.tensors:
        sizes[tensor.tensor_type.name] += int(tensor.n_elements)
    field = reader.fields.get("general.file_type")
    try:
        declared = LlamaFileType(int(field.parts[field.data[0]][0])).name if field else None
    except ValueError:
        declared = None
    return (declared.removeprefix("MOSTLY_").removeprefix("ALL_") if declared else None,
            [name for name, _ in sizes.most_common()])


def precision_note(path: Path) -> str:
    """What float32 weights read from this GGUF are: exact for a float file, the quantized values
    otherwise."""
    declared, types = stored_types(path)
    if not [name for name in types if name not in FLOAT_TYPES]:
        return f"stored as {'/'.join(types) or 'float'}, read as float32 exactly (no quantization error)"
    return (f"stored quantized as {declared or types[0]} ({'/'.join(types)}), dequantized to float32: its "
            "quantization error stays in the weights")


def gguf_model_dir(path: Path) -> Path:
    """A plain HF model folder for the GGUF base at `path` (converted on first use, then cached)."""
    from transplant.assets.gguf import convert_gguf
    from transplant.tokenizers.gguf_header import check_gguf
    from transplant.tokenizers.load import load_vocab

    check_gguf(path)
    dest = cache_dir() / "gguf" / "models" / _content_key(path)
    log.warning("GGUF base %s: %s; cached in %s", path.name, precision_note(path), dest)
    if (dest / "config.json").exists():
        return dest
    vocab = load_vocab(path)
    try:
        return convert_gguf(path, dest, tokenizer=vocab.tokenizer)
    except RuntimeError as err:  # the saved folder did not reproduce the GGUF model: say so, in one line
        raise TransplantError(f"cannot convert {path} faithfully ({err}); pass the model's "
                              "Hugging Face folder instead") from err


def _dequantized(reader, name: str):
    import gguf
    import torch

    tensor = next((t for t in reader.tensors if t.name == name), None)
    if tensor is None:
        return None
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise TransplantError(f"the gguf package cannot dequantize {name} "
                              f"({tensor.tensor_type.name}); pass the "
                              "donor's Hugging Face folder instead") from err
    rows = int(tensor.shape[-1])  # GGUF lists dimensions innermost first: (hidden, vocab)
    return torch.from_numpy(values.reshape(rows, -1).copy())


def gguf_embeddings_dir(path: Path) -> Path:
    """A small folder holding only the donor's embedding matrices (dequantized) and tokenizer (module
    docstring): what `transplant.io.surgery.read_embeddings` and `load_vocab` read from a donor."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    from transplant.tokenizers.gguf_header import check_gguf
    from transplant.tokenizers.load import load_vocab

    check_gguf(path)
    dest = cache_dir() / "gguf" / "embeddings" / _content_key(path)
    if (dest / "config.json").exists():
        return dest
    log.warning("GGUF donor %s: its embedding matrices are dequantized to float32", path.name)
    reader = GGUFReader(path)
    embed, output = _dequantized(reader, TOKEN_EMBD), _dequantized(reader, OUTPUT)
    if embed is None:
        raise TransplantError(f"{path} has no {TOKEN_EMBD} tensor; pass a GGUF model (not a "
                              "vocabulary-only file) or use a method that needs only the donor's "
                              "tokenizer (--method fvt)")
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else "unknown"
    tensors = {"model.embed_tokens.weight": embed.contiguous()}
    if output is not None:
        tensors["lm_head.weight"] = output.contiguous()
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {"vocab_size": embed.shape[0], "hidden_size": embed.shape[1],
                  "tie_word_embeddings": output is None, "gguf_architecture": arch,
                  "note": "embedding matrices only, dequantized from a GGUF file"}
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        load_vocab(path).save(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
