"""Model surgery that streams: read only the embeddings, write a new model one tensor at a time.

`read_embeddings` opens the base's safetensors headers, finds the input (and output) embedding by the
architecture's naming conventions and loads only those. `write_transplanted` writes a complete Hugging Face
model directory with new embedding matrices: every other tensor is copied byte-for-byte (or cast, when a dtype
is asked for) into shards laid out like the base's, and config.json, generation_config.json, the tokenizer and
the model card are rewritten. Peak memory is the embedding matrices plus one tensor, so a 70B model is
transplanted on a workstation. The output is built in a temporary directory beside the destination and renamed
into place (`transplant.io.atomic`), so an error (including a full disk) leaves nothing half-written. Every
input header and the config fields the surgery relies on are validated before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from transplant.assets.weight_names import INPUT_NAMES, INPUT_SUFFIXES, OUTPUT_NAMES, OUTPUT_SUFFIXES
from transplant.errors import TransplantError
from transplant.io import safetensors, vocab_tensors
from transplant.io.atomic import atomic_output
from transplant.io.chat_config import set_model_max_length
from transplant.io.model_config import (
    check_ids,
    config_hidden_size,
    config_says_tied,
    config_vocab_size,
    load_config,
    normalise_special_ids,
    text_config,
    updated_config,
    updated_generation_config,
)
from transplant.io.token_ids import TokenIdMap, remap_token_ids, token_id_map
from transplant.io.vocab_tensors import RowComposer, sparse_composer

__all__ = ["BaseEmbeddings", "read_embeddings", "write_transplanted", "estimate_output_bytes",
           "check_token_ids", "token_id_map", "sparse_composer", "TokenIdMap", "RowComposer", "INPUT_NAMES",
           "OUTPUT_NAMES"]

log = logging.getLogger(__name__)

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")  # a multimodal model's processor: read by AutoProcessor, not the
                   #                        tokenizer


@dataclass
class BaseEmbeddings:
    """The base model's embedding matrices as stored (original dtype) and where they live."""

    input: torch.Tensor  # [V_base, D]
    output: torch.Tensor | None  # [V_base, D] lm_head; None when tied to the input
    input_name: str
    output_name: str | None
    tied: bool
    dtype: torch.dtype
    config: dict  # parsed config.json
    rows_beyond_config: int = 0  # rows past config.json's vocab_size: transformers cannot load it as is


# ---------------------------------------------------------------- reading


def _find(entries: dict[str, safetensors.TensorEntry], exact: tuple[str, ...], suffixes: tuple[str, ...],
          vocab: int | None, what: str) -> str | None:
    for name in exact:
        if name in entries and len(entries[name].shape) == 2:
            return name
    hits = [n for n in entries if n.endswith(suffixes) and len(entries[n].shape) == 2]
    if len(hits) > 1 and vocab is not None:
        hits = [n for n in hits if entries[n].shape[0] == vocab] or hits
    if len(hits) > 1:
        raise TransplantError(f"several {what} candidates ({', '.join(hits[:4])}); this architecture is not "
                              "supported yet, please report it with the model's config.json")
    return hits[0] if hits else None


def locate_embeddings(entries: dict[str, safetensors.TensorEntry], config: dict, model_dir: Path):
    """Names of the input and output embedding (output None when absent) by convention, else by vocab rows."""
    vocab = config_vocab_size(config)
    input_name = _find(entries, INPUT_NAMES, INPUT_SUFFIXES, vocab, "input embedding")
    output_name = _find(entries, OUTPUT_NAMES, OUTPUT_SUFFIXES, vocab, "output embedding")
    if input_name is None and vocab is not None:
        # unknown naming: the 2-D tensors with one row per token, input before output in storage order
        rows = [n for n, e in entries.items() if len(e.shape) == 2 and e.shape[0] == vocab
                and n != output_name]
        ranked = sorted(rows, key=lambda n: not any(k in n for k in ("embed", "wte", "tok")))
        if output_name is None and len(ranked) == 2:
            input_name, output_name = ranked
        elif len(ranked) == 1 or (ranked and len(ranked) <= 2 and output_name is not None):
            input_name = ranked[0]
        elif len(ranked) > 2:
            raise TransplantError(f"cannot tell which of {', '.join(ranked[:4])} is the embedding in "
                                  f"{model_dir}; "
                                  "this architecture is not supported yet, please report it")
    if input_name is None:
        raise TransplantError(
            f"no embedding tensor in {model_dir} (looked for {INPUT_NAMES[0]}, {INPUT_NAMES[3]}, ... and any "
            "2-D "
            f"tensor with vocab_size={vocab} rows); pass the folder of a causal language model with its "
            "embeddings"
        )
    return input_name, output_name


def _check_width(entry: safetensors.TensorEntry, config: dict, model_dir: Path) -> None:
    hidden = config_hidden_size(config)
    if hidden is not None and entry.shape[1] != hidden:
        raise TransplantError(f"{model_dir}/config.json says hidden size {hidden} but the embedding "
                              f"{entry.name} is "
                              f"{entry.shape[1]} wide; fix config.json or re-download the model")


def _check_rows(entry: safetensors.TensorEntry, config: dict, model_dir: Path) -> int:
    """config.json's vocab_size against the embedding's rows (the language model's, for a multimodal one).
    More rows is padding, common and harmless: the surgery reads the rows and writes its own vocab_size. Fewer
    rows mean the weights were cut or the config belongs to another model: ids the config promises would
    index past the matrix. Returns the rows beyond the config's vocab_size."""
    vocab = (text_config(config) or {}).get("vocab_size", config.get("vocab_size"))  # types: check_config
    rows = entry.shape[0]
    if not isinstance(vocab, int) or vocab == rows:
        return 0
    if rows > vocab:
        log.warning("%s/config.json says vocab_size=%d but the embedding %s has %d rows: the %d rows beyond "
                    "are taken as padding", model_dir, vocab, entry.name, rows, rows - vocab)
        return rows - vocab
    raise TransplantError(f"{model_dir}/config.json says vocab_size={vocab} but the embedding {entry.name} "
                          f"has only {rows} rows; fix config.json or re-download the model")


def read_embeddings(model_dir: Path) -> BaseEmbeddings:
    """Load only the base's embedding matrices (memory-mapped reads of two tensors, whatever the model
    size)."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    entries, _ = safetensors.weight_entries(model_dir)
    input_name, output_name = locate_embeddings(entries, config, model_dir)
    _check_width(entries[input_name], config, model_dir)
    beyond = _check_rows(entries[input_name], config, model_dir)
    tied = output_name is None or config_says_tied(config) is True
    try:
        embeddings = safetensors.load_tensor(entries[input_name])
        output = None if tied else safetensors.load_tensor(entries[output_name])
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise TransplantError(f"cannot read the embeddings of {model_dir} ({exc}); re-download the base "
                              "model") from exc
    log.info("base embeddings: %s %s%s", input_name, tuple(embeddings.shape),
             " (tied)" if tied else f", output {output_name} {tuple(output.shape)}")
    return BaseEmbeddings(embeddings, output, input_name, None if tied else output_name, tied,
                          embeddings.dtype, config, beyond)


# ---------------------------------------------------------------- new matrices


MAX_PAD_MULTIPLE = 65536  # kernels ask for 8 to 128; 10^9 meant allocating 128 GB of padding rows


def padded_rows(rows: int, pad_to_multiple_of: int | None) -> int:
    """`rows` rounded up to a multiple of `pad_to_multiple_of` (refused above `MAX_PAD_MULTIPLE`)."""
    if pad_to_multiple_of and pad_to_multiple_of > MAX_PAD_MULTIPLE:
        raise TransplantError(f"pad_to_multiple_of={pad_to_multiple_of} is larger than {MAX_PAD_MULTIPLE}; "
                              "pad to a small multiple such as 64")
    if not pad_to_multiple_of or pad_to_multiple_of <= 1:
        return rows
    return -(-rows // pad_to_multiple_of) * pad_to_multiple_of


def pad_embeddings(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """Append copies of the mean row up to `rows`; the padded ids belong to no token and must stay inert.

    Output side: a row's logit is linear in the row, so the mean row scores exactly the average of the real
    logits, and by Jensen exp(mean) <= mean(exp): a padded id can never get more than 1/V of the probability,
    whatever the context. In practice it is far less (bench/RESULTS.md, Surgery: 1e-8..1e-11 per id on
    SmolLM2 and Gemma 3, ~1000x below a zero row, which scores 0 and beats every real token in some contexts).
    Input side: an in-distribution vector, harmless if a padded id is ever fed in. transformers'
    `resize_token_embeddings` samples N(mean, 1e-9 cov), i.e. the same row up to noise.
    """
    extra = rows - matrix.shape[0]
    if extra <= 0:
        return matrix
    fill = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype).expand(extra, -1)
    return torch.cat([matrix, fill], dim=0)


def _check_shape(matrix: torch.Tensor, hidden: int, what: str) -> None:
    if matrix.ndim != 2 or matrix.shape[1] != hidden or not matrix.is_floating_point() or not matrix.shape[0]:
        raise ValueError(f"{what} must be a floating [V, {hidden}] matrix, got {tuple(matrix.shape)} "
                         f"{matrix.dtype}")


def _check_finite(matrix: torch.Tensor, what: str) -> None:
    """After the cast, so an fp32 value that overflows float16 is caught too (aminmax propagates NaN,
    fast)."""
    low, high = torch.aminmax(matrix)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError(f"{what} contains NaN or inf (in {matrix.dtype})")


# ---------------------------------------------------------------- writing


def _default_output_name(input_name: str, entries: dict) -> str:
    """Where an untied copy of a tied embedding goes: the name this architecture loads its output matrix
    from."""
    if input_name == "gpt_neox.embed_in.weight":
        return "embed_out.weight"
    if input_name.startswith("language_model.model."):
        return "language_model.lm_head.weight"
    if "cls.predictions.bias" in entries:  # BERT-style masked LM
        return "cls.predictions.decoder.weight"
    if "lm_head.bias" in entries and "lm_head.weight" not in entries:  # RoBERTa-style masked LM
        return "lm_head.decoder.weight"
    return "lm_head.weight"


def _plan_weights(entries, input_name, base_output, new_input, new_output, dtype, extra=(), compose=None):
    """Base tensors in storage order, embeddings swapped for the new matrices, per-token tensors (`extra`,
    `vocab_tensors.VocabTensor`s) rebuilt with `compose`, the rest copied (or cast)."""
    output_name = base_output or _default_output_name(input_name, entries)
    rows = new_input.shape[0]
    per_token = {item.name: item.axis for item in extra}
    planned = []
    for name, entry in entries.items():
        if name in per_token:
            axis = per_token[name]
            cast = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype

            def make(entry=entry, axis=axis, cast=cast):
                return vocab_tensors.rebuild(safetensors.load_tensor(entry), axis, compose, rows, cast)

            planned.append(safetensors.plan_tensor(name, make, cast,
                                                   vocab_tensors.new_shape(entry.shape, axis, rows)))
        elif name == input_name:
            planned.append(safetensors.plan_tensor(name, lambda: new_input, new_input.dtype,
                                                   tuple(new_input.shape)))
            if new_output is not None and base_output is None:
                planned.append(safetensors.plan_tensor(output_name, lambda: new_output, new_output.dtype,
                                               tuple(new_output.shape)))
        elif name == base_output:
            if new_output is not None:
                planned.append(safetensors.plan_tensor(name, lambda: new_output, new_output.dtype,
                                                       tuple(new_output.shape)))
        else:
            planned.append(safetensors.plan_copy(entry, dtype))
    return planned


def _write_files(tmp: Path, base_dir: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        target = (tmp / rel).resolve()
        if Path(rel).is_absolute() or ".." in Path(rel).parts or tmp.resolve() not in target.parents:
            raise ValueError(f"extra file name {rel!r} must be a relative path inside the output")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    # licences, remote code and processors travel with the weights; tokenizers do not
    for path in base_dir.iterdir():
        if path.is_file() and (path.suffix == ".py" or path.name in PROCESSOR_FILES
                               or path.name.upper().startswith(("LICENSE", "NOTICE", "USE_POLICY"))):
            if not (tmp / path.name).exists():
                shutil.copy2(path, tmp / path.name)


def check_token_ids(base_dir: Path, special_ids: dict[str, int | None], token_map: TokenIdMap) -> None:
    """Refuse now (one line) a base whose config names a token the new vocabulary lacks; `write_transplanted`
    would refuse it too, but only after the solving."""
    base_dir = Path(base_dir)
    ids = normalise_special_ids(special_ids)
    # warnings come once, when the output is written
    remap_token_ids(load_config(base_dir), token_map, ids, [])
    generation = base_dir / "generation_config.json"
    try:
        settings = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
    except (OSError, ValueError, RecursionError):
        settings = {}  # unreadable: replaced when written
    if isinstance(settings, dict):
        remap_token_ids(settings, token_map, {k: v for k, v in ids.items() if k in settings}, [])


def estimate_output_bytes(model_dir: Path, new_rows: int, *, dtype: torch.dtype | None = None,
                          untie: bool = False) -> int:
    """Bytes the output will take: the base's tensors (cast to `dtype`) with embeddings of `new_rows` rows.

    Read from the headers only, so `check_output` can test free space before any solving."""
    config = load_config(model_dir)
    entries, _ = safetensors.weight_entries(model_dir)
    input_name, output_name = locate_embeddings(entries, config, model_dir)

    def size(entry: safetensors.TensorEntry, rows: int | None = None) -> int:
        numel = math.prod(entry.shape) if rows is None else rows * math.prod(entry.shape[1:])
        cast = dtype is not None and entry.dtype is not None and entry.dtype.is_floating_point
        return numel * safetensors.CODE_BITS[safetensors.DTYPE_TO_CODE[dtype] if cast else entry.code] // 8

    total = sum(size(e, new_rows if n in (input_name, output_name) else None) for n, e in entries.items())
    if untie and output_name is None:
        total += size(entries[input_name], new_rows)
    return total + 16 * 2**20


def write_transplanted(base_dir: Path, out_dir: Path, *, new_input: torch.Tensor,
                       new_output: torch.Tensor | None, save_tokenizer: Callable[[Path], None],
                       special_ids: dict[str, int | None], model_card: str, dtype: torch.dtype | None = None,
                       pad_to_multiple_of: int | None = None, overwrite: bool = False,
                       extra_files: dict[str, str | bytes] | None = None,
                       before_commit: Callable[[Path], None] | None = None,
                       protected: Iterable[str | os.PathLike] = (), vocab_rows: RowComposer | None = None,
                       token_map: TokenIdMap | None = None, name_or_path: str | None = None) -> Path:
    """Write the base model with new embeddings as a complete HF model folder at `out_dir`; return it.

    `before_commit(tmp_dir)` runs on the complete folder before it is renamed into place (evaluation,
    reports), so a failure there leaves no output behind, like any other failure. The folder is written
    through
    `atomic_output`: `overwrite` replaces only an earlier tokentransplant output, never the base or the paths
    in `protected` (the donor), and the folder carries the `tokentransplant.json` marker.

    `new_output` None ties the output to the input embedding; a matrix unties it. `dtype` casts every
    floating tensor. Embedding rows are padded to `pad_to_multiple_of` (see `pad_embeddings`).

    Other per-token tensors (a masked LM's decoder bias, ...) are rebuilt with `vocab_rows` (`sparse_composer`
    of the plan: see `transplant.io.vocab_tensors`); a base that has them and no `vocab_rows` is a ValueError.
    With `token_map` every token-id field of config.json and generation_config.json is carried to the new ids,
    or the model is refused before anything is written (`transplant.io.token_ids`). Processor files are
    copied.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir).absolute()
    config = load_config(base_dir)
    entries, shard_sizes = safetensors.weight_entries(base_dir)
    input_name, output_name = locate_embeddings(entries, config, base_dir)
    hidden = entries[input_name].shape[1]
    _check_shape(new_input, hidden, "new_input")
    if new_output is not None:
        _check_shape(new_output, hidden, "new_output")
        if new_output.shape[0] != new_input.shape[0]:
            raise ValueError(f"new_output has {new_output.shape[0]} rows, new_input {new_input.shape[0]}")
    rows = padded_rows(new_input.shape[0], pad_to_multiple_of)
    ids = normalise_special_ids(special_ids)
    check_ids(ids, rows)

    input_dtype = dtype or entries[input_name].dtype
    output_dtype = dtype or (entries[output_name].dtype if output_name else input_dtype)
    new_input = pad_embeddings(new_input.detach().to("cpu", input_dtype), rows)
    _check_finite(new_input, "new_input")
    if new_output is not None:
        new_output = pad_embeddings(new_output.detach().to("cpu", output_dtype), rows)
        _check_finite(new_output, "new_output")
    extra = vocab_tensors.find_vocab_tensors(entries, entries[input_name].shape[0], (input_name, output_name))
    if extra and vocab_rows is None:
        raise ValueError(f"{base_dir} has per-token tensors {[t.name for t in extra][:3]}; pass vocab_rows")
    if extra:
        log.info("rebuilding per-token tensors %s", ", ".join(t.name for t in extra))
    # config files first: a token id the new vocabulary cannot hold refuses the model before anything is
    # written
    new_config = updated_config(config, vocab_size=rows, ids=ids, tied=new_output is None, dtype=dtype,
                                token_map=token_map, name_or_path=name_or_path)
    generation = updated_generation_config(base_dir, ids, token_map)
    planned = _plan_weights(entries, input_name, output_name, new_input, new_output, dtype, extra, vocab_rows)
    max_shard = max(shard_sizes) if len(shard_sizes) > 1 else None
    shards = safetensors.split_into_shards(planned, max_shard)
    needed = sum(t.nbytes for t in planned) + 16 * 2**20

    with atomic_output(out_dir, overwrite=overwrite, protected=[base_dir, *protected], estimate_bytes=needed,
                       kind="transplant") as tmp:
        save_tokenizer(tmp)  # user code and cheap: fail before minutes of weight writing
        set_model_max_length(tmp, new_config)  # the base's context, whatever the donor said
        names = safetensors.write_shards(tmp, shards, {"format": "pt"})
        files: dict[str, str | bytes] = {
            "config.json": json.dumps(new_config, indent=2, sort_keys=True) + "\n",
            "generation_config.json": json.dumps(generation, indent=2) + "\n",
            "README.md": model_card,
            **(extra_files or {}),
        }
        _write_files(tmp, base_dir, files)
        if before_commit is not None:
            before_commit(tmp)
    log.info("wrote %s: %d shard(s), vocab %d, %s", out_dir, len(names), rows,
             "tied" if new_output is None else "untied")
    return out_dir
