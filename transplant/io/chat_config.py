"""Stop tokens of a chat output: generation must end a reply at the template's end-of-turn marker.

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
    """Make generation_config.json's `eos_token_id` a list holding `ids` (after any it already has)."""
    path = Path(model_dir) / "generation_config.json"
    if len(ids) < 2 or not path.is_file():
        return
    generation = json.loads(path.read_text(encoding="utf-8"))
    current = generation.get("eos_token_id")
    current = [current] if isinstance(current, int) else list(current or [])
    merged = current + [i for i in ids if i not in current]
    if merged == current:
        return
    generation["eos_token_id"] = merged
    log.info("generation stops at token ids %s", merged)
    tmp = path.with_name(".generation_config.json.tmp")
    tmp.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
