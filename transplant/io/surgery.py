"""Model surgery that streams: read only the embeddings, write a new model one tensor at a time.

`read_embeddings` opens the base's safetensors headers, finds the input (and output) embedding by the
architecture's naming conventions and loads only those. `write_transplanted` writes a complete Hugging Face
model directory with new embedding matrices: every other tensor is copied byte-for-byte (or cast, when a dtype
is asked for) into shards laid out like the base's, and config.json, generation_config.json, the tokenizer and
the model card are rewritten. Peak memory is the embedding matrices plus one tensor, so a 70B model is
transplanted on a workstation. The output is built in a temporary directory beside the destination and renamed
into place, so an error (including a full disk) leaves nothing half-written.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from transplant.errors import TransplantError
from transplant.io import safetensors

log = logging.getLogger(__name__)

# Exact names first (most common architectures), then suffixes for wrappers that add a prefix.
INPUT_NAMES = (
    "model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight", "transformer.word_embeddings.weight",
    "transformer.embedding.word_embeddings.weight", "model.tok_embeddings.weight", "tok_embeddings.weight",
    "backbone.embeddings.weight", "backbone.embedding.weight", "embed_tokens.weight", "wte.weight",
)
INPUT_SUFFIXES = (".embed_tokens.weight", ".wte.weight", ".word_embeddings.weight", ".embed_in.weight",
                  ".tok_embeddings.weight")
OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight", "language_model.lm_head.weight", "output.weight",
                "transformer.output_layer.weight")
OUTPUT_SUFFIXES = (".lm_head.weight", ".embed_out.weight")
# generation_config keys that hold base-vocabulary ids and would misfire (or crash) with a new tokenizer
STALE_GENERATION_KEYS = ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                         "bad_words_ids", "force_words_ids", "sequence_bias", "decoder_start_token_id")
SPECIAL_ROLE_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


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


# ---------------------------------------------------------------- reading


def load_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TransplantError(f"base model directory {model_dir} does not exist; pass a Hugging Face model folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise TransplantError(f"{model_dir} has no config.json; pass a Hugging Face model folder "
                              "(config.json + *.safetensors), e.g. one written by save_pretrained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransplantError(f"{path} is not valid JSON ({exc}); re-download or re-save the base model") from exc
    if not isinstance(config, dict):
        raise TransplantError(f"{path} is not a JSON object; re-download or re-save the base model")
    return config


def _text_config(config: dict) -> dict | None:
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else None


def config_vocab_size(config: dict) -> int | None:
    for scope in (config, _text_config(config) or {}):
        if isinstance(scope.get("vocab_size"), int):
            return scope["vocab_size"]
    return None


def _config_says_tied(config: dict) -> bool | None:
    for scope in (_text_config(config) or {}, config):
        if isinstance(scope.get("tie_word_embeddings"), bool):
            return scope["tie_word_embeddings"]
    return None


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
        rows = [n for n, e in entries.items() if len(e.shape) == 2 and e.shape[0] == vocab and n != output_name]
        ranked = sorted(rows, key=lambda n: not any(k in n for k in ("embed", "wte", "tok")))
        if output_name is None and len(ranked) == 2:
            input_name, output_name = ranked
        elif len(ranked) == 1 or (ranked and len(ranked) <= 2 and output_name is not None):
            input_name = ranked[0]
        elif len(ranked) > 2:
            raise TransplantError(f"cannot tell which of {', '.join(ranked[:4])} is the embedding in {model_dir}; "
                                  "this architecture is not supported yet, please report it")
    if input_name is None:
        raise TransplantError(
            f"no embedding tensor in {model_dir} (looked for {INPUT_NAMES[0]}, {INPUT_NAMES[3]}, ... and any 2-D "
            f"tensor with vocab_size={vocab} rows); pass the folder of a causal language model with its embeddings"
        )
    return input_name, output_name


def read_embeddings(model_dir: Path) -> BaseEmbeddings:
    """Load only the base's embedding matrices (memory-mapped reads of two tensors, whatever the model size)."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    entries, _ = safetensors.weight_entries(model_dir)
    input_name, output_name = locate_embeddings(entries, config, model_dir)
    tied = output_name is None or _config_says_tied(config) is True
    try:
        embeddings = safetensors.load_tensor(entries[input_name])
        output = None if tied else safetensors.load_tensor(entries[output_name])
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise TransplantError(f"cannot read the embeddings of {model_dir} ({exc}); re-download the base model") from exc
    log.info("base embeddings: %s %s%s", input_name, tuple(embeddings.shape),
             " (tied)" if tied else f", output {output_name} {tuple(output.shape)}")
    return BaseEmbeddings(embeddings, output, input_name, None if tied else output_name, tied,
                          embeddings.dtype, config)


# ---------------------------------------------------------------- new matrices


def padded_rows(rows: int, pad_to_multiple_of: int | None) -> int:
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
    if matrix.ndim != 2 or matrix.shape[1] != hidden or not matrix.is_floating_point():
        raise ValueError(f"{what} must be a floating [V, {hidden}] matrix, got {tuple(matrix.shape)} {matrix.dtype}")


def _check_finite(matrix: torch.Tensor, what: str) -> None:
    """After the cast, so an fp32 value that overflows float16 is caught too (aminmax propagates NaN, fast)."""
    low, high = torch.aminmax(matrix)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError(f"{what} contains NaN or inf (in {matrix.dtype})")


# ---------------------------------------------------------------- config files


def _normalise_special_ids(special_ids: dict[str, int | None]) -> dict[str, int | list[int] | None]:
    """Role names (bos/eos/pad) or config keys -> config keys; bos, eos and pad are always set.

    An id the caller does not give is set to null rather than left alone: the base's value refers to the
    old vocabulary, and removing the key would let a config class default (Llama: bos=1, eos=2) creep back.
    """
    out: dict[str, int | list[int] | None] = dict.fromkeys(SPECIAL_ROLE_KEYS.values())
    for key, value in special_ids.items():
        out[SPECIAL_ROLE_KEYS.get(key, key)] = value
    return out


def _check_ids(ids: dict, vocab_size: int) -> None:
    for key, value in ids.items():
        for idx in value if isinstance(value, list) else [value]:
            if idx is not None and not (isinstance(idx, int) and 0 <= idx < vocab_size):
                raise ValueError(f"special id {key}={idx} is outside the new vocabulary of {vocab_size}")


def updated_config(config: dict, *, vocab_size: int, ids: dict, tied: bool, dtype: torch.dtype | None) -> dict:
    config = json.loads(json.dumps(config))
    nested = _text_config(config)
    scopes = [config] + ([nested] if nested is not None else [])
    config["tie_word_embeddings"] = tied
    if nested is not None and "tie_word_embeddings" in nested:
        nested["tie_word_embeddings"] = tied
    if nested is not None and "vocab_size" in nested:
        nested["vocab_size"] = vocab_size
    if "vocab_size" in config or nested is None or "vocab_size" not in nested:
        config["vocab_size"] = vocab_size
    for key, value in ids.items():
        config[key] = value
        if nested is not None and key in nested:
            nested[key] = value
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for scope in scopes:
            for key in ("dtype", "torch_dtype"):
                if key in scope:
                    scope[key] = name
        if "dtype" not in config and "torch_dtype" not in config:
            config["torch_dtype"] = name
    stale = sorted({k for scope in scopes for k in scope if k.endswith(("_token_id", "_token_index"))} - set(ids))
    if stale:
        log.warning("config keys %s still hold base-vocabulary ids; pass them in special_ids to map them", stale)
    return config


def updated_generation_config(base_dir: Path, ids: dict) -> dict:
    path = base_dir / "generation_config.json"
    generation: dict = {}
    if path.is_file():
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("ignoring unreadable %s", path)
    dropped = [k for k in STALE_GENERATION_KEYS if k in generation and k not in ids]
    for key in dropped:
        del generation[key]
    if dropped:
        log.warning("dropped generation_config keys %s: they hold base-vocabulary ids", dropped)
    for key, value in ids.items():
        if key in SPECIAL_ROLE_KEYS.values() or key in generation:
            generation[key] = value
    return generation


# ---------------------------------------------------------------- writing


def _default_output_name(input_name: str) -> str:
    if input_name == "gpt_neox.embed_in.weight":
        return "embed_out.weight"
    if input_name.startswith("language_model.model."):
        return "language_model.lm_head.weight"
    return "lm_head.weight"


def _plan_weights(entries, input_name, base_output, new_input, new_output, dtype):
    """Base tensors in storage order, embeddings swapped for the new matrices, the rest copied (or cast)."""
    output_name = base_output or _default_output_name(input_name)
    planned = []
    for name, entry in entries.items():
        if name == input_name:
            planned.append(safetensors.plan_tensor(name, lambda: new_input, new_input.dtype, tuple(new_input.shape)))
            if new_output is not None and base_output is None:
                planned.append(safetensors.plan_tensor(output_name, lambda: new_output, new_output.dtype,
                                               tuple(new_output.shape)))
        elif name == base_output:
            if new_output is not None:
                planned.append(safetensors.plan_tensor(name, lambda: new_output, new_output.dtype, tuple(new_output.shape)))
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
    for path in base_dir.iterdir():  # licences and remote code travel with the weights; tokenizer files do not
        if path.is_file() and (path.suffix == ".py" or path.name.upper().startswith(("LICENSE", "NOTICE", "USE_POLICY"))):
            if not (tmp / path.name).exists():
                shutil.copy2(path, tmp / path.name)


def _prepare_destination(base_dir: Path, out_dir: Path, overwrite: bool, needed_bytes: int) -> Path:
    """Check the destination and create the temp dir beside it (same filesystem, so the final rename is atomic)."""
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise TransplantError(f"output {out_dir} already exists; pass --overwrite to replace it or choose "
                                  "another --output")
        if not out_dir.is_dir():
            raise TransplantError(f"output {out_dir} exists and is not a directory; choose another --output")
    base_real, out_real = base_dir.resolve(), out_dir.resolve()
    if base_real == out_real or out_real in base_real.parents:
        raise TransplantError(f"output {out_dir} would replace the base model; choose another --output")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise TransplantError(f"cannot write into {out_dir.parent} ({exc.strerror or exc}); choose another "
                              "--output") from exc
    free = shutil.disk_usage(tmp).free
    if free < needed_bytes:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TransplantError(f"disk full: writing {out_dir} needs {needed_bytes / 2**30:.2f} GiB but only "
                              f"{free / 2**30:.2f} GiB are free; free space or choose another --output")
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_transplanted(base_dir: Path, out_dir: Path, *, new_input: torch.Tensor, new_output: torch.Tensor | None,
                       save_tokenizer: Callable[[Path], None], special_ids: dict[str, int | None],
                       model_card: str, dtype: torch.dtype | None = None, pad_to_multiple_of: int | None = None,
                       overwrite: bool = False, extra_files: dict[str, str | bytes] | None = None,
                       before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write the base model with new embeddings as a complete HF model folder at `out_dir`; return it.

    `before_commit(tmp_dir)` runs on the complete folder before it is renamed into place (evaluation, reports),
    so a failure there leaves no output behind, like any other failure.

    `new_output` None ties the output to the input embedding; a matrix unties it. `dtype` casts every
    floating tensor. Embedding rows are padded to `pad_to_multiple_of` (see `pad_embeddings`).
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
    ids = _normalise_special_ids(special_ids)
    _check_ids(ids, rows)

    input_dtype = dtype or entries[input_name].dtype
    output_dtype = dtype or (entries[output_name].dtype if output_name else input_dtype)
    new_input = pad_embeddings(new_input.detach().to("cpu", input_dtype), rows)
    _check_finite(new_input, "new_input")
    if new_output is not None:
        new_output = pad_embeddings(new_output.detach().to("cpu", output_dtype), rows)
        _check_finite(new_output, "new_output")
    planned = _plan_weights(entries, input_name, output_name, new_input, new_output, dtype)
    max_shard = max(shard_sizes) if len(shard_sizes) > 1 else None
    shards = safetensors.split_into_shards(planned, max_shard)
    needed = sum(t.nbytes for t in planned) + 16 * 2**20

    tmp = _prepare_destination(base_dir, out_dir, overwrite, needed)
    try:
        save_tokenizer(tmp)  # user code and cheap: fail before minutes of weight writing
        names = safetensors.write_shards(tmp, shards, {"format": "pt"})
        new_config = updated_config(config, vocab_size=rows, ids=ids, tied=new_output is None, dtype=dtype)
        files: dict[str, str | bytes] = {
            "config.json": json.dumps(new_config, indent=2, sort_keys=True) + "\n",
            "generation_config.json": json.dumps(updated_generation_config(base_dir, ids), indent=2) + "\n",
            "README.md": model_card,
            **(extra_files or {}),
        }
        _write_files(tmp, base_dir, files)
        if before_commit is not None:
            before_commit(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TransplantError(f"disk full while writing {out_dir}; free space or choose another --output") from exc
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise TransplantError(f"cannot write {out_dir} ({exc.strerror}); choose another --output") from exc
        raise
    log.info("wrote %s: %d shard(s), vocab %d, %s", out_dir, len(names), rows, "tied" if new_output is None else "untied")
    return out_dir
