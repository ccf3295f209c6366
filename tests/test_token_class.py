"""token_class on hand-made tokens, and through Vocab for a byte-level and a SentencePiece vocabulary: the
same text gets the same class whichever family spells it."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models

from transplant.tokenizers import formats
from transplant.tokenizers.token_class import TOKEN_CLASSES, token_class, vocab_classes
from transplant.tokenizers.vocab import TokenKind, Vocab, describe_tokens

CASES = [
    (" the", "space-word"),
    ("  Straße", "space-word"),
    (" cafe\u0301", "space-word"),  # decomposed é: a combining mark stays Latin
    ("ing", "word-piece"),
    ("Str", "word-piece"),
    ("2024", "digits"),
    (" 7", "digits"),
    ("()", "punct"),
    (" {", "punct"),
    ("    ", "punct"),
    ("🙂", "punct"),
    ("\n\n", "newline"),
    ("\t\t", "newline"),
    (".\n", "newline"),
    ("}\n    ", "newline"),
    ("word\n", "newline"),
    ("(self", "mixed"),
    ("'s", "mixed"),
    ("x2", "mixed"),
    (" New York", "mixed"),
    ("日本", "cjk"),
    ("する", "cjk"),
    ("。", "cjk"),
    (" 한국", "cjk"),
    (" при", "other-script"),
    ("ال", "other-script"),
    ("नम", "other-script"),
    ("ि", "other-script"),  # a Devanagari vowel sign alone
    (" αβ", "other-script"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_text_tokens(text, expected):
    assert token_class(text.encode(), TokenKind.NORMAL) == expected


def test_bytes_and_specials():
    assert token_class(b"\n", TokenKind.BYTE) == "byte"  # <0x0A>: a byte-fallback token stays a byte
    assert token_class("日".encode()[:2]) == "byte"  # part of a multi-byte character
    assert token_class(b"\xe3") == "byte"
    assert token_class(b"", TokenKind.SPECIAL) == "special"
    assert token_class(b"", TokenKind.NORMAL) == "special"
    assert token_class(b"A") == "word-piece"  # an ASCII byte piece is text


def _vocab(pieces: list[str], decoder) -> Vocab:
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    backend.decoder = decoder
    token_bytes, kinds, special = describe_tokens(backend)
    return Vocab(tokenizer=None, token_bytes=token_bytes, kinds=kinds, roles={}, special_texts=special)


def _byte_level(text: str) -> str:
    to_char = {latin: chr(uni) for uni, latin in formats.BYTE_LEVEL_TO_LATIN1.items()}
    return "".join(to_char[b] for b in text.encode())


def test_families_agree():
    texts = [" the", "ing", " 12", "\n\n", "(self", " при", "日本", " {"]
    byte_level = _vocab([_byte_level(t) for t in texts] + ["Ã", _byte_level("日")[:2]], decoders.ByteLevel())
    sentencepiece = _vocab([t.replace(" ", "▁") for t in texts] + ["<0x0A>", "<0xE6>"],
                           decoders.Metaspace(replacement="▁"))
    expected = [token_class(t.encode()) for t in texts]
    assert vocab_classes(byte_level)[: len(texts)] == expected
    assert vocab_classes(sentencepiece)[: len(texts)] == expected
    assert expected == ["space-word", "word-piece", "digits", "newline", "mixed", "other-script", "cjk",
                        "punct"]
    # a lone non-UTF-8 byte piece (byte-level) and byte-fallback tokens (SentencePiece) are bytes
    assert vocab_classes(byte_level)[len(texts):] == ["byte", "byte"]
    assert vocab_classes(sentencepiece)[len(texts):] == ["byte", "byte"]


def test_every_class_is_reachable():
    seen = {expected for _, expected in CASES} | {"byte", "special"}
    assert seen == set(TOKEN_CLASSES)
