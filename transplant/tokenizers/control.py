"""Chat and control tokens: keep an instruct model chat-capable across a tokenizer swap.

An instruct base was trained on its own chat markers (SmolLM2's `<|im_start|>`, `<|im_end|>`); those rows are
the most trained rows of the model for chatting. A donor tokenizer usually lacks them, so the markers of the
template we keep are added to the new tokenizer as special tokens at the end of its vocabulary (ids of
existing tokens never move), and `align` then joins them to the base rows by literal text: their rows are
exact copies. `--map-token NEW=BASE` lets a user pair a donor marker with a base one (Mistral `[INST]` <-
`<|im_start|>`).

Which template the output carries (`--chat-template`):
- `auto` (default): the base's when the base has one, else the donor's.
- `base`: the base's (an error when it has none); its markers are carried.
- `donor`: the donor's when it has one, else the base's (with a warning).
- `none`: no template.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from transplant.errors import TransplantError
from transplant.tokenizers.align import Alignment
from transplant.tokenizers.bos import follow_base_bos
from transplant.tokenizers.family import read_family_class
from transplant.tokenizers.vocab import TURN_END_ROLES, TokenKind, Vocab, rebuilt_vocab

log = logging.getLogger(__name__)

CHAT_TEMPLATE_CHOICES = ("auto", "base", "donor", "none")


@dataclass
class ChatPlan:
    """What happened to the chat template and control tokens; shown in the summary, report and card."""

    template_source: str  # "base", "donor" or "none"
    carried: list[str] = field(default_factory=list)  # base markers added to the new tokenizer
    renamed: dict[str, str] = field(default_factory=dict)  # base marker -> donor marker with the same role
    mapped: dict[str, str] = field(default_factory=dict)  # --map-token NEW -> BASE

    def summary(self) -> str:
        """One line for the CLI summary."""
        if self.template_source == "none":
            text = "no chat template"
        else:
            text = f"chat template from the {self.template_source}"
        if self.carried:
            text += f"; carried control tokens {', '.join(self.carried)} (base rows copied)"
        if self.renamed:
            text += "; reused donor tokens " + ", ".join(f"{b}->{d}" for b, d in self.renamed.items())
        if self.mapped:
            text += "; mapped " + ", ".join(f"{n}<-{b}" for n, b in self.mapped.items())
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"template_source": self.template_source, "carried_control_tokens": self.carried,
                "reused_donor_tokens": self.renamed, "mapped_tokens": self.mapped}


def parse_token_map(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["[INST]=<|im_start|>"]` -> {"[INST]": "<|im_start|>"}; the split is at the last `=` (a marker may
    hold one, e.g. `<a=b>` is rare but `=` as a BASE token is rarer)."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        new, sep, base = pair.rpartition("=")
        if not sep or not new or not base:
            raise TransplantError(f"--map-token {pair!r} is not NEW=BASE; write e.g. --map-token "
                                  "'[INST]=<|im_start|>'")
        if mapping.get(new, base) != base:  # the last one silently won before
            raise TransplantError(f"--map-token {new} is given twice, as {mapping[new]} and as {base}; "
                                  "keep one")
        mapping[new] = base
    return mapping


def template_markers(template: str, vocab: Vocab) -> list[int]:
    """Special ids of `vocab` whose literal text appears in the template, by id: the markers it emits."""
    return [idx for idx, text in sorted(vocab.special_texts.items()) if text and text in template]


def _template_of(vocab: Vocab) -> str | None:
    template = getattr(vocab.tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def choose_template(base: Vocab, new: Vocab, choice: str) -> tuple[str | None, str]:
    """(template, "base" | "donor" | "none") for `--chat-template choice`."""
    if choice not in CHAT_TEMPLATE_CHOICES:
        raise TransplantError(f"--chat-template {choice!r} is unknown; use one of "
                              f"{', '.join(CHAT_TEMPLATE_CHOICES)}")
    base_t, donor_t = _template_of(base), _template_of(new)
    if choice == "none":
        return None, "none"
    if choice == "base" and base_t is None:
        raise TransplantError("--chat-template base, but the base has no chat template; use "
                              "--chat-template donor or auto")
    if choice == "donor" and donor_t is None:
        if base_t is not None:
            log.warning("the donor has no chat template; carrying the base's instead")
        return (base_t, "base") if base_t else (None, "none")
    if choice == "donor" or (choice == "auto" and base_t is None):
        return (donor_t, "donor") if donor_t else (None, "none")
    return base_t, "base"


def with_added_specials(vocab: Vocab, texts: list[str], template: str | None) -> Vocab:
    """A new Vocab: `vocab` plus `texts` as special tokens at the end (existing ids unchanged) and `template`.

    Built from a copy of the backend, so a cached donor Vocab is never modified."""
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(vocab.tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in texts])
    for offset, text in enumerate(texts):
        if backend.token_to_id(text) != len(vocab) + offset:
            raise TransplantError(f"could not append control token {text!r} to {vocab.name!r} "
                                  "after its last id; pass --chat-template donor or none")
    return rebuilt_vocab(vocab, backend, template)


def prepare_new_vocab(base: Vocab, new: Vocab, *, chat_template: str = "auto",
                      map_tokens: dict[str, str] | None = None,
                      tokenizer_spec: str | os.PathLike | None = None) -> tuple[Vocab, ChatPlan]:
    """The new vocabulary with the kept template's markers added, and what was done.

    A base marker is not added when the donor has the same literal (aligned by text) or a special token with
    the same role (the template is rewritten to the donor's literal, and `align` joins them by role). The
    family class named by the donor's own files (`tokenizer_spec`) is recorded for `Vocab.save`."""
    new = dataclasses.replace(new, tokenizer_class=read_family_class(tokenizer_spec) or new.tokenizer_class)
    template, source = choose_template(base, new, chat_template)
    plan = ChatPlan(template_source=source, mapped=dict(map_tokens or {}))
    if source == "base" and template:
        donor_texts = set(new.special_texts.values())
        for idx in template_markers(template, base):
            text = base.special_texts[idx]
            role = base.role_of.get(idx)
            donor_id = new.roles.get(role) if role else None
            if text in donor_texts:
                continue
            if donor_id is not None and donor_id in new.special_texts and role not in ("bos", "eos",
                                                                                       "pad", "unk"):
                plan.renamed[text] = new.special_texts[donor_id]
                template = template.replace(text, new.special_texts[donor_id])
            else:
                plan.carried.append(text)
    if template != _template_of(new) or plan.carried:
        log.info("chat: %s", plan.summary())
        new = with_added_specials(new, plan.carried, template)
    return follow_base_bos(base, new), plan


def apply_token_map(alignment: Alignment, base: Vocab, new: Vocab,
                    map_tokens: dict[str, str] | None) -> Alignment:
    """`alignment` with each NEW token copying the row of its BASE token (`--map-token NEW=BASE`)."""
    if not map_tokens:
        return alignment
    new_ids = {text: idx for idx, text in new.special_texts.items()}
    base_ids = {text: idx for idx, text in base.special_texts.items()}
    new_to_base = alignment.new_to_base.clone()
    for new_text, base_text in map_tokens.items():
        new_id = new_ids.get(new_text, _normal_id(new, new_text))
        base_id = base_ids.get(base_text, _normal_id(base, base_text))
        if new_id is None:
            raise TransplantError(f"--map-token {new_text}={base_text}: the new tokenizer has no "
                                  f"token {new_text!r}; "
                                  "name one of its tokens (e.g. [INST])")
        if base_id is None:
            raise TransplantError(f"--map-token {new_text}={base_text}: the base tokenizer has no token "
                                  f"{base_text!r}; "
                                  "name one of its tokens (e.g. <|im_start|>)")
        new_to_base[new_id] = base_id
        log.info("token %r (id %d) copies base token %r (id %d)", new_text, new_id, base_text, base_id)
    return Alignment(new_to_base=new_to_base, matched_by_role=alignment.matched_by_role)


def _normal_id(vocab: Vocab, text: str) -> int | None:
    """The id of a single non-special token spelled `text` (its bytes), if there is one."""
    idx = vocab.bytes_to_id.get(text.encode())
    return idx if idx is not None and vocab.kinds[idx] is not TokenKind.SPECIAL else None


def stop_token_ids(vocab: Vocab, plan: ChatPlan) -> list[int]:
    """Ids that end an assistant turn under the kept template: its end markers (`<|im_end|>`) first, as what
    a reply ends with and what llama.cpp and parsers take for the end of turn, then eos (end of document)."""
    ids = []
    if plan.template_source != "none":
        ids = [vocab.roles[role] for role in TURN_END_ROLES if role in vocab.roles]
    if "eos" in vocab.roles and vocab.roles["eos"] not in ids:
        ids.append(vocab.roles["eos"])
    return list(dict.fromkeys(ids))


__all__ = ["CHAT_TEMPLATE_CHOICES", "ChatPlan", "apply_token_map", "choose_template", "parse_token_map",
           "prepare_new_vocab", "stop_token_ids", "template_markers"]
