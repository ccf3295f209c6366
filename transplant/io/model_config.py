"""config.json and generation_config.json of a model dir: read, type-checked, rewritten for a new vocabulary.

Surgery relies on a few config fields (vocab_size, the hidden size, the tie flag, text_config); `load_config`
checks their types before anything is read, so `vocab_size: "lots"` or `hidden_size: -1` is a one-line error
instead of an output that cannot load. The rewrite sets every special-token id for the new vocabulary and
drops generation settings that still hold base-vocabulary ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from transplant.errors import TransplantError
from transplant.io.token_ids import TokenIdMap, remap_token_ids, report

log = logging.getLogger(__name__)

# generation_config keys that hold base-vocabulary ids and would misfire (or crash) with a new tokenizer
STALE_GENERATION_KEYS = ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                         "begin_suppress_tokens", "bad_words_ids", "force_words_ids", "sequence_bias",
                         "decoder_start_token_id")
SPECIAL_ROLE_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


def load_config(model_dir: Path) -> dict:
    """The parsed, type-checked config.json of `model_dir` (one-line errors for a missing or damaged file)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TransplantError(f"base model directory {model_dir} does not exist; pass a Hugging Face model "
                              "folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise TransplantError(f"{model_dir} has no config.json; pass a Hugging Face model folder "
                              "(config.json + *.safetensors), e.g. one written by save_pretrained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise TransplantError(f"{path} is not valid JSON ({reason}); re-download or re-save the base "
                              "model") from exc
    if not isinstance(config, dict):
        raise TransplantError(f"{path} is not a JSON object; re-download or re-save the base model")
    check_config(config, path)
    return config


# sizes the surgery reads (the embedding width) or rewrites (vocab_size); each must be a positive int
_SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model")


def check_config(config: dict, path: Path) -> None:
    """Type-check the fields surgery relies on, so a bad value fails here, not as an output that cannot
    load."""
    nested = config.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        raise TransplantError(f"{path}: text_config must be an object, got {type(nested).__name__}; fix "
                              "config.json")
    for scope in (config, nested or {}):
        for key in _SIZE_KEYS:
            value = scope.get(key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                          and value > 0):
                raise TransplantError(f"{path}: {key} must be a positive integer, got {value!r}; fix "
                                      "config.json")
        tie = scope.get("tie_word_embeddings")
        if tie is not None and not isinstance(tie, bool):
            raise TransplantError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}; fix "
                                  "config.json")


def config_hidden_size(config: dict) -> int | None:
    for scope in (text_config(config) or {}, config):
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(scope.get(key), int):
                return scope[key]
    return None


def text_config(config: dict) -> dict | None:
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else None


def config_vocab_size(config: dict) -> int | None:
    for scope in (config, text_config(config) or {}):
        if isinstance(scope.get("vocab_size"), int):
            return scope["vocab_size"]
    return None


def config_says_tied(config: dict) -> bool | None:
    for scope in (text_config(config) or {}, config):
        if isinstance(scope.get("tie_word_embeddings"), bool):
            return scope["tie_word_embeddings"]
    return None


def normalise_special_ids(special_ids: dict[str, int | None]) -> dict[str, int | list[int] | None]:
    """Role names (bos/eos/pad) or config keys -> config keys; bos, eos and pad are always set.

    An id the caller does not give is set to null rather than left alone: the base's value refers to the
    old vocabulary, and removing the key would let a config class default (Llama: bos=1, eos=2) creep back.
    """
    out: dict[str, int | list[int] | None] = dict.fromkeys(SPECIAL_ROLE_KEYS.values())
    for key, value in special_ids.items():
        out[SPECIAL_ROLE_KEYS.get(key, key)] = value
    return out


def check_ids(ids: dict, vocab_size: int) -> None:
    for key, value in ids.items():
        for idx in value if isinstance(value, list) else [value]:
            if idx is not None and not (isinstance(idx, int) and 0 <= idx < vocab_size):
                raise ValueError(f"special id {key}={idx} is outside the new vocabulary of {vocab_size}")


def updated_config(config: dict, *, vocab_size: int, ids: dict, tied: bool, dtype: torch.dtype | None,
                   token_map: TokenIdMap | None = None, name_or_path: str | None = None) -> dict:
    """config.json for the new vocabulary. With `token_map`, every other token-id key (nested ones included)
    is carried to the new ids or refused (`transplant.io.token_ids`); without it they are left and warned
    about. `_name_or_path` names the base by its Hub id where known (`name_or_path`); the name a GGUF carried
    inside (`_model_name_or_path`, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2") names no model anyone can load."""
    config = json.loads(json.dumps(config))
    config.pop("_model_name_or_path", None)
    config.pop("_name_or_path", None)
    if name_or_path:
        config["_name_or_path"] = name_or_path
    nested = text_config(config)
    scopes = [config] + ([nested] if nested is not None else [])
    config["tie_word_embeddings"] = tied
    if nested is not None and "tie_word_embeddings" in nested:
        nested["tie_word_embeddings"] = tied
    if nested is not None and "vocab_size" in nested:
        nested["vocab_size"] = vocab_size
    if "vocab_size" in config or nested is None or "vocab_size" not in nested:
        config["vocab_size"] = vocab_size
    if token_map is not None:  # before the ids are set: a list-valued eos keeps its other tokens
        notes: list[str] = []
        remap_token_ids(config, token_map, ids, notes)
        report(notes, "config.json")
    for key, value in ids.items():
        if token_map is None or key not in config:
            config[key] = value
        if token_map is None and nested is not None and key in nested:
            nested[key] = value
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for scope in scopes:
            for key in ("dtype", "torch_dtype"):
                if key in scope:
                    scope[key] = name
        if "dtype" not in config and "torch_dtype" not in config:
            config["torch_dtype"] = name
    if token_map is not None:
        return config
    stale = sorted({k for scope in scopes for k in scope
                    if k.endswith(("_token_id", "_token_index"))} - set(ids))
    if stale:
        log.warning("config keys %s still hold base-vocabulary ids; pass them in special_ids to map "
                    "them", stale)
    return config


def updated_generation_config(base_dir: Path, ids: dict, token_map: TokenIdMap | None = None) -> dict:
    """The base's generation settings with the new special ids; an unreadable file is replaced, not fatal.

    With `token_map` the other id settings are carried over like config.json's (`transplant.io.token_ids`)."""
    path = base_dir / "generation_config.json"
    generation: dict = {}
    if path.is_file():
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            log.warning("ignoring unreadable %s", path)
        if not isinstance(generation, dict):
            log.warning("ignoring %s: not a JSON object", path)
            generation = {}
    if token_map is not None:
        notes: list[str] = []
        remap_token_ids(generation, token_map, {k: v for k, v in ids.items() if k in generation}, notes)
        report(notes, "generation_config.json")
        for key in SPECIAL_ROLE_KEYS.values():
            generation.setdefault(key, ids.get(key))
        return generation
    dropped = [k for k in STALE_GENERATION_KEYS if k in generation and k not in ids]
    for key in dropped:
        del generation[key]
    if dropped:
        log.warning("dropped generation_config keys %s: they hold base-vocabulary ids", dropped)
    for key, value in ids.items():
        if key in SPECIAL_ROLE_KEYS.values() or key in generation:
            generation[key] = value
    return generation


def is_causal_lm(config: dict) -> bool:
    """Whether the config's architecture predicts the next token (bits per byte means something only then); a
    config that names no architecture is taken to be one, as the tiny test models are."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or not names:
        return True
    return any(str(n).endswith(("ForCausalLM", "LMHeadModel")) for n in names)
