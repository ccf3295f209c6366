"""Chat conversations for distillation: each side's own template markup around shared message contents.

Teacher and student usually have different chat templates (and different special tokens), so the rendered
conversations differ in their markup but never in the message contents. Each side renders the conversation
with its own template and tokenizes it ONCE, as it will at use (so SentencePiece sides see no dummy prefix
before every turn, and a token may straddle markup and content, like "▁Is" after "[INST] "). Every token is
then mapped to the byte span of the rendered text it spells (`token_spans`), each message's content span is
looked up by byte offsets, and the tokens strictly inside it on both sides, trimmed to the first and last
offsets where both sides start and end a token, form a shared (aligned) piece; everything else is per-side
markup (no chunks). That is what makes chat data distillable across tokenizers.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from distill.chunks import cut_pair, vocab_tables
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
    # templates raise anything (e.g. "roles must alternate"); the plain format still works
    except Exception as err:
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


def chat_markups(messages: list[dict], teacher: Vocab, student: Vocab,
                 mode: str) -> tuple[list[str], list[str]]:
    """(teacher markup, student markup) pieces for `messages`; each list has len(messages) + 1 strings."""
    own = {"teacher": template_markup(teacher.tokenizer, messages)
           if mode in ("auto", "own", "teacher") else None,
           "student": template_markup(student.tokenizer, messages)
           if mode in ("auto", "own", "student") else None}
    plain = plain_markup(messages)
    if mode == "teacher":
        return (own["teacher"] or plain,) * 2
    if mode == "student":
        return (own["student"] or plain,) * 2
    return own["teacher"] or plain, own["student"] or plain


class Piece(NamedTuple):
    """A run of tokens in a packed window, per side. Aligned pieces spell the same bytes from a text start on
    both sides (`phantom`: the first text token's leading space is not text; None: the dummy-prefix rule)."""

    teacher_ids: list[int]
    student_ids: list[int]
    aligned: bool  # both sides spell the same bytes (else: side-specific markup, no chunks)
    teacher_phantom: bool | None = None
    student_phantom: bool | None = None


class TokenSpans(NamedTuple):
    starts: np.ndarray  # int64 [T]: byte offset in the rendered text where each token starts
    ends: np.ndarray  # int64 [T]
    phantom: np.ndarray  # bool [T]: the token's leading space is not in the text (a dummy prefix)
    mapped: int  # tokens [0, mapped) are mapped; from the first mismatch on (a normalizer rewrote bytes),
    #              none


def token_spans(ids: list[int], vocab: Vocab, text: bytes) -> TokenSpans:
    """Byte spans of `text` that the tokens of its tokenization `ids` spell.

    Runs of non-special tokens must spell the text, allowing a phantom leading space on a run's first token
    (SentencePiece adds one at the start and, in legacy mode, after every special); a special spans its
    literal text where the text has it (a template's "[INST]") and nothing otherwise (a prepended BOS).
    Vectorised per run of text tokens (a conversation has a few runs)."""
    tables = vocab_tables(vocab)
    arr = np.asarray(ids, dtype=np.int64)
    n = arr.size
    starts, ends, phantom = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
    special = tables.is_special[arr] if n else np.zeros(0, bool)
    run_stops = np.append(np.flatnonzero(special), n)  # a text run ends at the next special (or the end)
    pos, k = 0, 0
    while k < n:
        if special[k]:
            literal = vocab.special_texts.get(int(arr[k]), "").encode("utf-8")
            width = len(literal) if literal and text.startswith(literal, pos) else 0
            starts[k], ends[k] = pos, pos + width
            pos, k = pos + width, k + 1
            continue
        stop = int(run_stops[np.searchsorted(run_stops, k)])
        lengths = tables.lengths[arr[k:stop]].copy()
        spelled = b"".join(tables.token_bytes[i] for i in arr[k:stop].tolist())
        if not text.startswith(spelled, pos):
            if spelled[:1] == b" " and text.startswith(spelled[1:], pos):
                lengths[0] -= 1
                phantom[k] = True
            else:
                return TokenSpans(starts, ends, phantom, k)
        run_ends = pos + np.cumsum(lengths)
        starts[k:stop], ends[k:stop] = run_ends - lengths, run_ends
        pos, k = int(run_ends[-1]) if stop > k else pos, stop
    return TokenSpans(starts, ends, phantom, n)


def _inside(spans: TokenSpans, special: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """[first, stop) token indices of the contiguous text tokens lying entirely in bytes [lo, hi)."""
    first = int(np.searchsorted(spans.starts[:spans.mapped], lo, side="left"))
    empty = (spans.ends[first:spans.mapped]
             == spans.starts[first:spans.mapped]) & ~special[first:spans.mapped]
    # a zero-length phantom "▁" is markup
    first += int(np.argmin(empty)) if not empty.all() else int(empty.size)
    ends, starts = spans.ends[first:spans.mapped], spans.starts[first:spans.mapped]
    inside = ~special[first:spans.mapped] & (ends <= hi) & (ends > starts)
    return first, first + (int(np.argmin(inside)) if not inside.all() else inside.size)


def _common(t_rel: tuple[np.ndarray, np.ndarray],
            s_rel: tuple[np.ndarray, np.ndarray]) -> tuple[int, int, int, int]:
    """Index ranges [t_lo, t_hi), [s_lo, s_hi) of two runs trimmed to the first offset where both start a
    token and the last where both end one (offsets relative to the content start); empty ranges when none."""
    (t_starts, t_ends), (s_starts, s_ends) = t_rel, s_rel
    first = np.intersect1d(t_starts, s_starts)
    if not first.size:
        return 0, 0, 0, 0
    lo = first[0]
    last = np.intersect1d(t_ends, s_ends)
    last = last[last > lo]
    if not last.size:
        return 0, 0, 0, 0
    hi = last[-1]
    return (int(np.searchsorted(t_starts, lo)), int(np.searchsorted(t_ends, hi)) + 1,
            int(np.searchsorted(s_starts, lo)), int(np.searchsorted(s_ends, hi)) + 1)


def _render(messages: list[dict], markup: list[str], vocab: Vocab):
    """(ids, spans, content byte spans) of one side's rendering, tokenized once (BOS prepended if missing)."""
    pieces, content = [], []
    size = 0
    for i, part in enumerate(markup):
        size += len(part.encode("utf-8"))
        pieces.append(part)
        if i < len(messages):
            data = messages[i]["content"].encode("utf-8")
            content.append((size, size + len(data)))
            size += len(data)
            pieces.append(messages[i]["content"])
    text = "".join(pieces)
    ids = vocab.encode(text, add_special_tokens=False)
    bos = vocab.roles.get("bos")
    if bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids, token_spans(ids, vocab, text.encode("utf-8")), content


def conversation_pieces(messages: list[dict], teacher: Vocab, student: Vocab, mode: str,
                        room: tuple[int, int], min_room: int = 8) -> tuple[list[Piece], bool]:
    """A conversation as window pieces cut to `room` (tokens per side), and whether it fitted whole.

    Markup pieces hold each side's own tokens between shared contents; a content piece that does not fit is
    cut at the last byte offset both sides end a token at, and the conversation ends there."""
    t_markup, s_markup = chat_markups(messages, teacher, student, mode)
    (t_ids, t_spans, t_content), (s_ids, s_spans, s_content) = (_render(messages, t_markup, teacher),
                                                                 _render(messages, s_markup, student))
    t_special = vocab_tables(teacher).is_special[np.asarray(t_ids, np.int64)]
    s_special = vocab_tables(student).is_special[np.asarray(s_ids, np.int64)]
    runs = []  # (t_lo, t_hi, s_lo, s_hi) token ranges of each shared content piece, in order
    t_from = s_from = 0
    for (ta, tb), (sa, sb) in zip(t_content, s_content):
        t_first, t_stop = _inside(t_spans, t_special, ta, tb)
        s_first, s_stop = _inside(s_spans, s_special, sa, sb)
        t_first, s_first = max(t_first, t_from), max(s_first, s_from)
        rel_t = (t_spans.starts[t_first:t_stop] - ta, t_spans.ends[t_first:t_stop] - ta)
        rel_s = (s_spans.starts[s_first:s_stop] - sa, s_spans.ends[s_first:s_stop] - sa)
        tl, th, sl, sh = _common(rel_t, rel_s)
        if th > tl and sh > sl:
            runs.append((t_first + tl, t_first + th, s_first + sl, s_first + sh))
            t_from, s_from = t_first + th, s_first + sh
    pieces, left = [], list(room)
    t_at = s_at = 0
    for t_lo, t_hi, s_lo, s_hi in runs + [(len(t_ids), None, len(s_ids), None)]:
        markup = Piece(t_ids[t_at:t_lo], s_ids[s_at:s_lo], False)
        if len(markup.teacher_ids) > left[0] or len(markup.student_ids) > left[1]:
            return pieces, False
        if markup.teacher_ids or markup.student_ids:
            pieces.append(markup)
            left = [left[0] - len(markup.teacher_ids), left[1] - len(markup.student_ids)]
        if t_hi is None:
            return pieces, True
        if min(left) < min_room:
            return pieces, False
        phantom = (bool(t_spans.phantom[t_lo]), bool(s_spans.phantom[s_lo]))
        content = Piece(t_ids[t_lo:t_hi], s_ids[s_lo:s_hi], True, *phantom)
        if len(content.teacher_ids) > left[0] or len(content.student_ids) > left[1]:
            cut = cut_pair(content.teacher_ids, content.student_ids, teacher, student,
                           (left[0], left[1]), phantom)
            if cut.teacher_ids and cut.student_ids:
                pieces.append(Piece(cut.teacher_ids, cut.student_ids, True, *phantom))
            return pieces, False
        pieces.append(content)
        left = [left[0] - len(content.teacher_ids), left[1] - len(content.student_ids)]
        t_at, s_at = t_hi, s_hi
    return pieces, True
