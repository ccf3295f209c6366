"""Config fields that hold token ids, carried to the new vocabulary (or refused with the token they name).

A config holds ids beyond bos/eos/pad: a multimodal model's `image_token_index` is read by its forward pass,
an encoder-decoder's `decoder_start_token_id` by generation, nested configs (`text_config`, ...) repeat them.
Each id is a token of the base vocabulary; the new id of the same token comes from the alignment (bytes, or
the literal text of a special). Every key ending in `_token_id`, `_token_ids` or `_token_index`, in the config
and in any nested object, is handled:

* bos/eos/pad/unk are what the new tokenizer says they are (its own roles), set by the caller; a list-valued
  eos (`[<|endoftext|>, <|im_end|>]`) keeps its other entries where they exist in the new vocabulary.
* Optional keys (OPTIONAL_KEYS: roles, forced bos/eos, suppressed tokens) are remapped where the token exists,
  else set to null (lists: the entry is dropped) with a warning.
* Every other key is required: it is remapped, or the model is refused with one line naming the key, the token
  and the fix, before anything is written. An unknown key is treated as required, since a model may read it.
* Generation settings that hold token *sequences* of the old tokenizer (DROPPED_KEYS) are dropped with a
  warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

OPTIONAL_KEYS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
    "mask_token_id", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
})
LIST_KEYS = ("suppress_tokens", "begin_suppress_tokens")
DROPPED_KEYS = ("bad_words_ids", "force_words_ids", "sequence_bias", "forced_decoder_ids")


def is_token_id_key(key: str) -> bool:
    return key.endswith(("_token_id", "_token_ids", "_token_index")) or key in LIST_KEYS


@dataclass
class TokenIdMap:
    """Base id -> new id for every base token that exists in the new vocabulary, and the base token names."""

    base_to_new: dict[int, int]
    base_names: dict[int, str] = field(default_factory=dict)
    base_size: int | None = None

    def name(self, base_id: int) -> str:
        return repr(self.base_names[base_id]) if base_id in self.base_names else f"#{base_id}"


def token_id_map(new_to_base: torch.Tensor, base_names: dict[int, str] | None = None,
                 base_size: int | None = None) -> TokenIdMap:
    """Invert an alignment's new->base table; when several new ids share a base id the lowest wins."""
    mapping: dict[int, int] = {}
    for new_id, base_id in enumerate(new_to_base.tolist()):
        if base_id >= 0:
            mapping.setdefault(int(base_id), new_id)
    return TokenIdMap(mapping, dict(base_names or {}), base_size)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _map_one(value: int, ids: TokenIdMap, key: str, where: str, optional: bool,
             notes: list[str]) -> int | None:
    if value < 0:  # -1 and friends mean "none" in some configs
        return value
    new = ids.base_to_new.get(value)
    if new is not None:
        return new
    what = f"{where}{key}={value} (base token {ids.name(value)})"
    if optional:
        notes.append(f"{what} has no counterpart in the new vocabulary; dropped")
        return None
    raise TransplantError(
        f"{what} names a token the new tokenizer does not have, and the model reads it; add that token to "
        "the donor tokenizer (e.g. as a special token) or use a donor that has it"
    )


def _map_value(value: Any, ids: TokenIdMap, key: str, where: str, notes: list[str]) -> Any:
    optional = key in OPTIONAL_KEYS
    if _is_id(value):
        return _map_one(value, ids, key, where, optional, notes)
    if isinstance(value, list) and all(_is_id(v) for v in value):
        mapped = [_map_one(v, ids, key, where, optional, notes) for v in value]
        return [v for v in mapped if v is not None]
    return value  # null, or a shape we do not know (left alone)


def _merge_fixed(base_value: Any, fixed: Any, ids: TokenIdMap, key: str, where: str, notes: list[str]) -> Any:
    """The new tokenizer's own id first; a list-valued base entry keeps its other tokens that still exist."""
    if not isinstance(base_value, list) or fixed is None or isinstance(fixed, list):
        return fixed
    rest = _map_value([v for v in base_value if _is_id(v)], ids, key, where, notes)
    merged = list(dict.fromkeys([fixed, *rest]))
    return merged if len(merged) > 1 else fixed


def remap_token_ids(scope: dict, ids: TokenIdMap, fixed: dict[str, Any], notes: list[str],
                    where: str = "") -> None:
    """Rewrite, in place, every token-id key of `scope` and of the objects nested in it (module docstring).

    `fixed` holds the caller's ids (the new tokenizer's bos/eos/pad/unk); they replace the base's value
    wherever that key appears. Unmappable optional ids become null or leave their list; required ones
    raise."""
    for key in list(scope):
        value = scope[key]
        if isinstance(value, dict):
            remap_token_ids(value, ids, fixed, notes, f"{where}{key}.")
        elif key in DROPPED_KEYS and value:
            notes.append(f"{where}{key} holds token sequences of the base tokenizer; dropped")
            del scope[key]
        elif key in fixed:
            scope[key] = _merge_fixed(value, fixed[key], ids, key, where, notes)
        elif is_token_id_key(key):
            scope[key] = _map_value(value, ids, key, where, notes)


def report(notes: list[str], what: str) -> None:
    for note in notes:
        log.warning("%s: %s", what, note)
