"""Chat conversations for distillation: each side's own template markup around shared message contents.

Teacher and student usually have different chat templates (and different special tokens), so the rendered
conversations differ in their markup but never in the message contents. The packer tokenizes markup per side
(unaligned, no chunks) and contents as shared pieces (aligned), which is what makes chat data distillable
across tokenizers.
"""

from __future__ import annotations

import logging
from typing import Any

from transplant.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)

CHAT_MODES = ("auto", "own", "plain", "teacher", "student")
_SENTINEL = "\u2063TTMSG{}\u2063"  # invisible separator: never produced by templates, never stripped


def plain_markup(messages: list[dict]) -> list[str]:
    """`role: content` turns separated by blank lines; the markup pieces around each content."""
    return [("\n\n" if i else "") + f"{m['role']}: " for i, m in enumerate(messages)] + [""]


def template_markup(tokenizer: Any, messages: list[dict]) -> list[str] | None:
    """The markup a chat template puts before each message and after the last (None: no usable template).

    Renders the template with sentinel contents and splits at them, so any Jinja template works as long as it
    inserts each content verbatim (templates that rewrite contents fall back to the plain format).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    fake = [{"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    try:
        rendered = tokenizer.apply_chat_template(fake, tokenize=False)
    except Exception as err:  # templates raise anything (e.g. "roles must alternate"); the plain format still works
        log.debug("chat template failed (%s); using the plain format", err)
        return None
    parts, pos = [], 0
    for i in range(len(messages)):
        found = rendered.find(_SENTINEL.format(i), pos)
        if found < 0:
            return None
        parts.append(rendered[pos:found])
        pos = found + len(_SENTINEL.format(i))
    return parts + [rendered[pos:]]


def chat_markups(messages: list[dict], teacher: Vocab, student: Vocab, mode: str) -> tuple[list[str], list[str]]:
    """(teacher markup, student markup) pieces for `messages`; each list has len(messages) + 1 strings."""
    own = {"teacher": template_markup(teacher.tokenizer, messages) if mode in ("auto", "own", "teacher") else None,
           "student": template_markup(student.tokenizer, messages) if mode in ("auto", "own", "student") else None}
    plain = plain_markup(messages)
    if mode == "teacher":
        return (own["teacher"] or plain,) * 2
    if mode == "student":
        return (own["student"] or plain,) * 2
    return own["teacher"] or plain, own["student"] or plain
