"""Which tokens of a vocabulary its own tokenizer can never emit.

A row for a token the tokenizer never emits is never read as input, but in the output layer it still competes:
a byte-fallback twin such as Gemma's `<0x31>` (whose byte `1` is also a normal piece) is aligned by bytes onto
the base's `1` and gets an exact copy of its row, so in a tied model every `1` is predicted with half its
probability (issue 10; bench/RESULTS.md, "Unreachable rows and fidelity fixes"). Three kinds are unreachable:

- byte-fallback tokens `<0xNN>` whose byte is also a normal piece: the model always uses the piece;
- byte-fallback tokens of bytes that never occur in UTF-8 text (0xC0, 0xC1, 0xF5–0xFF): input is a `str`;
- normal pieces that the tokenizer does not produce from their own text.

The last test encodes each piece's own text in one batched call (`encode_batch`, ~1 s for 262k tokens). A
SentencePiece model with a dummy prefix turns text `x` into `▁x`, so a piece that does not start a word
(`ing`) cannot be isolated as text; for those, and for byte-level pieces that are not valid UTF-8 on their own
(half a character), the BPE model itself is asked to tokenize the piece's own model string (no normalizer, no
pre-tokenizer). Either way the test is "the piece alone": a piece reachable only inside longer words whose
merge order differs is counted unreachable; that is rare, and such a piece is rare in text too.
"""

from __future__ import annotations

import logging

import torch

from transplant.tokenizers.vocab import TokenKind, Vocab

log = logging.getLogger(__name__)

# Lead bytes that never occur in well-formed UTF-8 (RFC 3629): their fallback tokens are unreachable from
# text.
NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


def byte_twins(vocab: Vocab) -> list[int]:
    """Byte-fallback ids whose byte is also a normal piece, or a byte that never occurs in UTF-8 text."""
    normal = {piece for piece, kind in zip(vocab.token_bytes, vocab.kinds) if kind is TokenKind.NORMAL}
    return [i for i, (piece, kind) in enumerate(zip(vocab.token_bytes, vocab.kinds))
            if kind is TokenKind.BYTE and (piece in normal or piece[0] in NEVER_IN_UTF8)]


def _isolated_text(vocab: Vocab, piece: bytes) -> str | None:
    """The text whose encoding is this piece alone, or None when no such text can be written."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # the dummy prefix supplies the leading space; without one we cannot isolate it
    if vocab.adds_prefix_space:
        return text[1:] if text.startswith(" ") and len(text) > 1 else None
    return text


def _model_level_misses(vocab: Vocab, ids: list[int]) -> list[int]:
    """Ids the tokenizer's model does not produce from the piece's own model string (one Rust call each)."""
    backend = vocab.tokenizer.backend_tokenizer
    model = backend.model
    missed = []
    for idx in ids:
        string = backend.id_to_token(idx)
        if string is None:
            continue
        tokens = model.tokenize(string)
        if len(tokens) != 1 or tokens[0].id != idx:
            missed.append(idx)
    return missed


def unreachable_piece_ids(vocab: Vocab, batch_size: int = 16384) -> list[int]:
    """Normal pieces whose own text does not encode to exactly that piece (batched; see module docstring)."""
    backend = getattr(vocab.tokenizer, "backend_tokenizer", None)
    if backend is None:
        log.info("vocab %r has no fast tokenizer: only byte-fallback twins are checked", vocab.name)
        return []
    texts: list[str] = []
    text_ids: list[int] = []
    model_ids: list[int] = []
    added = set(backend.get_added_tokens_decoder())
    for idx, (piece, kind) in enumerate(zip(vocab.token_bytes, vocab.kinds)):
        if kind is not TokenKind.NORMAL or not piece or idx in added:
            # added (non-special) tokens are matched literally before the model runs: always reachable
            continue
        text = _isolated_text(vocab, piece)
        if text is None:
            model_ids.append(idx)
        else:
            texts.append(text)
            text_ids.append(idx)
    missed: list[int] = []
    for start in range(0, len(texts), batch_size):
        encodings = backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
        missed += [idx for idx, enc in zip(text_ids[start : start + batch_size], encodings)
                   if enc.ids != [idx]]
    return sorted(missed + _model_level_misses(vocab, model_ids))


def unreachable_ids(vocab: Vocab) -> torch.Tensor:
    """Every id of `vocab` (specials aside) that its tokenizer can never emit, sorted."""
    ids = sorted(set(byte_twins(vocab)) | set(unreachable_piece_ids(vocab)))
    return torch.tensor(ids, dtype=torch.long)
