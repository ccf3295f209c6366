"""Whether the output tokenizer puts a BOS in front of a text: as the base model did, not as the donor did.

The model was trained under the base's convention. SmolLM2 never saw a BOS; Mistral's tokenizer adds `<s>`
to every text. Kept as the donor's, a chat prompt rendered to a string and tokenized gains a BOS that the ids
path of `apply_chat_template` does not add (two id sequences for one prompt), and every prompt starts with a
token the base never saw there. So the post-processor's BOS is removed when the base adds none, and added
when the base adds one and the donor has a BOS token but does not add it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from transplant.tokenizers.family import special_flags
from transplant.tokenizers.vocab import Vocab, rebuilt_vocab

log = logging.getLogger(__name__)


def adds_bos(vocab: Vocab) -> bool:
    """Whether encoding a text with special tokens puts `vocab`'s BOS first."""
    return special_flags(vocab.tokenizer.backend_tokenizer, vocab.roles)["add_bos_token"]


def _without_specials(processor: dict[str, Any]) -> dict[str, Any]:
    """A TemplateProcessing (or a Sequence holding one) that adds no special token."""
    if processor.get("type") == "Sequence":
        return {**processor, "processors": [_without_specials(p) for p in processor["processors"]]}
    if processor.get("type") != "TemplateProcessing":
        return processor
    keep = {side: [piece for piece in processor[side] if "SpecialToken" not in piece]
            for side in ("single", "pair")}
    return {**processor, **keep, "special_tokens": {}}


def _with_bos(processor: dict[str, Any] | None, bos: str, bos_id: int) -> dict[str, Any]:
    """`processor` followed by a TemplateProcessing that puts `bos` before each sequence."""
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    if processor is None:
        return template
    return {"type": "Sequence", "processors": [_without_specials(processor), template]}


def follow_base_bos(base: Vocab, new: Vocab) -> Vocab:
    """`new` adding a BOS exactly when `base` does (unchanged when they agree or `new` has no BOS token)."""
    from tokenizers import Tokenizer

    base_adds, new_adds = adds_bos(base), adds_bos(new)
    bos_id = new.roles.get("bos")
    if base_adds == new_adds or (base_adds and (bos_id is None or bos_id not in new.special_texts)):
        return new
    data = json.loads(new.tokenizer.backend_tokenizer.to_str())
    processor = data.get("post_processor")
    if base_adds:
        data["post_processor"] = _with_bos(processor, new.special_texts[bos_id], bos_id)
    else:
        data["post_processor"] = _without_specials(processor)
    backend = Tokenizer.from_str(json.dumps(data))
    log.info("BOS as the base: %s",
             "added to every text" if base_adds else "none added (the base never saw one)")
    rebuilt = rebuilt_vocab(new, backend, getattr(new.tokenizer, "chat_template", None))
    if adds_bos(rebuilt) != base_adds:
        log.warning("could not make the tokenizer add a BOS as the base does; kept the donor's convention")
        return new
    return rebuilt
