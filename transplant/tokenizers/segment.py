"""Split a new token's bytes into base-vocabulary pieces.

FVT, byte pooling, number composition and the hypernetwork all start from "how would the base model have seen
these bytes". The base tokenizer's own segmentation is the faithful answer; where it cannot be asked (bytes
that are not valid UTF-8, e.g. half of a multi-byte character, or a SentencePiece dummy prefix that would add
a space) we fall back to greedy longest-match over the base vocabulary's bytes, which always succeeds when the
base has all 256 single bytes (byte-level BPE or byte fallback).
"""

from __future__ import annotations

from transplant.tokenizers.vocab import Vocab


def greedy_segment(piece: bytes, bytes_to_id: dict[bytes, int], max_len: int) -> list[int]:
    """Longest-prefix-first segmentation; bytes the base cannot represent are skipped."""
    ids: list[int] = []
    pos = 0
    while pos < len(piece):
        for length in range(min(max_len, len(piece) - pos), 0, -1):
            found = bytes_to_id.get(piece[pos : pos + length])
            if found is not None:
                ids.append(found)
                pos += length
                break
        else:
            pos += 1
    return ids


def _encode_texts(vocab: Vocab, texts: list[str]) -> list[list[int]]:
    backend = getattr(vocab.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return [vocab.encode(text) for text in texts]


def segment_with_base(base: Vocab, pieces: list[bytes]) -> list[list[int]]:
    """Base-tokenizer segmentation of each byte string, verified byte-exact, greedy fallback otherwise."""
    table = base.bytes_to_id
    max_len = max((len(b) for b in table), default=1)
    queries: list[tuple[int, str]] = []
    for idx, piece in enumerate(pieces):
        if not piece:
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if base.adds_prefix_space:
            if not text.startswith(" "):
                continue  # the dummy prefix would add a space we cannot remove: greedy fallback
            text = text[1:]
        queries.append((idx, text))
    result: list[list[int] | None] = [None] * len(pieces)
    if queries:
        encoded = _encode_texts(base, [text for _, text in queries])
        for (idx, _), ids in zip(queries, encoded):
            if ids and b"".join(base.token_bytes[i] for i in ids) == pieces[idx]:
                result[idx] = list(ids)
    return [ids if ids is not None else greedy_segment(piece, table, max_len)
            for ids, piece in zip(result, pieces)]
