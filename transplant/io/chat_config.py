"""Stop tokens of a chat output (generation must end a reply at the template's end-of-turn marker), and the
tokenizer's `model_max_length` from the base's context.

A carried base template ends turns with its own marker (SmolLM2's `<|im_end|>`), while config.json's
`eos_token_id` is the donor's eos (`</s>`); without the marker in generation_config.json's `eos_token_id`,
`generate` and `pipeline("text-generation")` run on past the end of the reply.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def add_stop_tokens(model_dir: Path, ids: list[int]) -> None:
    """Make generation_config.json's `eos_token_id` the list `ids` (the template's end of turn first), then
    any it already had: tools that take one stop token take the first."""
    path = Path(model_dir) / "generation_config.json"
    if len(ids) < 2 or not path.is_file():
        return
    generation = json.loads(path.read_text(encoding="utf-8"))
    current = generation.get("eos_token_id")
    current = [current] if isinstance(current, int) else list(current or [])
    merged = list(ids) + [i for i in current if i not in ids]
    if merged == current:
        return
    generation["eos_token_id"] = merged
    log.info("generation stops at token ids %s", merged)
    tmp = path.with_name(".generation_config.json.tmp")
    tmp.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def set_model_max_length(model_dir: Path, config: dict) -> int | None:
    """Write the base's context (`max_position_embeddings`) as tokenizer_config.json's `model_max_length`.

    The donor's tokenizer rarely states one (transformers then reports 1e30 and `truncation=True` never cuts),
    and what bounds the output's context is the base's position table, not the donor's.
    """
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    length = config.get("max_position_embeddings") or nested.get("max_position_embeddings")
    path = Path(model_dir) / "tokenizer_config.json"
    if not isinstance(length, int) or length <= 0 or not path.is_file():
        return None
    tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    tokenizer_config["model_max_length"] = length
    tmp = path.with_name(".tokenizer_config.json.tmp")
    tmp.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return length

