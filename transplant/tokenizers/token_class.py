"""A coarse class for every vocabulary token, from its bytes: which kinds of tokens a method serves well.

Two initializers can tie on average and still split by token (bench/RESULTS.md, "Default method": fvt-ls wins
german, omp english and code). Attributing a held-out loss change to classes of tokens needs a class that is
the same for every tokenizer family, so it is read from `Vocab.token_bytes` (`Ġthe`, `▁the` and tiktoken's
raw bytes are all b" the"), never from a family's spelling. The first rule that matches wins:

- `special`: control and added special tokens (no bytes in decoded text).
- `byte`: byte-fallback `<0xNN>` tokens, and byte-level pieces that are not whole UTF-8 (`\\xe3\\x81`).
- `cjk`: any Han, kana, Hangul or CJK/fullwidth punctuation character.
- `other-script`: any letter or mark outside the Latin script (Cyrillic, Greek, Arabic, Devanagari, ...).
- `newline`: contains a newline, carriage return or tab (indentation runs, `.\\n`, `}\\n\\n`).
- `digits`: decimal digits, with or without leading spaces.
- `space-word`: leading space(s) then Latin letters only (` the`, ` Straße`).
- `word-piece`: Latin letters only, no leading space (`ing`, `Str`).
- `punct`: no letters or digits: punctuation, symbols, emoji, runs of spaces.
- `mixed`: the rest: letters or digits glued to punctuation, digits or inner spaces (`(self`, `'s`, `x2`).
"""

from __future__ import annotations

import unicodedata

from transplant.tokenizers.vocab import TokenKind, Vocab

TOKEN_CLASSES = ("space-word", "word-piece", "digits", "punct", "newline", "mixed", "cjk", "other-script",
                 "byte", "special")

# Han (with extensions and compatibility), kana, Hangul, CJK symbols and fullwidth forms
_CJK_RANGES = ((0x1100, 0x11FF), (0x2E80, 0x2FDF), (0x3000, 0x31FF), (0x3200, 0x9FFF), (0xA960, 0xA97F),
               (0xAC00, 0xD7FF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x20000, 0x3FFFF))


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_letter(char: str) -> bool:
    """Letters and combining marks (a decomposed `é` is `e` + U+0301; Devanagari vowel signs are marks)."""
    return unicodedata.category(char)[0] in "LM"


def _is_latin(char: str) -> bool:
    """A Latin letter, or a script-less one: a combining mark takes its base letter's script, and `ª`, `º`
    and modifier letters (`ʼ`) belong to no script of their own."""
    return unicodedata.name(char, "").startswith(("LATIN", "COMBINING", "MODIFIER LETTER", "FEMININE",
                                                   "MASCULINE"))


def token_class(piece: bytes, kind: TokenKind = TokenKind.NORMAL) -> str:
    """The class (one of TOKEN_CLASSES) of a token with these decoded bytes and this kind."""
    if kind is TokenKind.SPECIAL or not piece:
        return "special"
    if kind is TokenKind.BYTE:
        return "byte"
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return "byte"  # a byte-level piece of a multi-byte character
    if any(_is_cjk(c) for c in text):
        return "cjk"
    if any(_is_letter(c) and not _is_latin(c) for c in text):
        return "other-script"
    if any(c in "\n\r\t" for c in text):
        return "newline"
    core = text.lstrip(" ")
    if not core or not any(_is_letter(c) or c.isdigit() for c in core):
        return "punct"
    if all(c.isdigit() for c in core):
        return "digits"
    if all(_is_letter(c) for c in core):
        return "space-word" if core != text else "word-piece"
    return "mixed"


def vocab_classes(vocab: Vocab) -> list[str]:
    """token_class of every id of `vocab`, in id order."""
    return [token_class(piece, kind) for piece, kind in zip(vocab.token_bytes, vocab.kinds)]


def parse_classes(value: object) -> str:
    """A method option naming token classes: `none` or '+'-joined class names, checked when options are
    read (an unknown name fails before anything loads)."""
    text = str(value).strip().lower()
    unknown = class_set(text) - set(TOKEN_CLASSES)
    if unknown:
        raise ValueError(f"unknown token classes {sorted(unknown)}; choose from {'+'.join(TOKEN_CLASSES)}")
    return text


def class_set(option: str) -> set[str]:
    """A `parse_classes` option as a set of class names (none: empty)."""
    return set() if option in ("", "none") else set(option.split("+"))
