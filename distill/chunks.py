"""Byte-chunk alignment between a teacher and a student tokenization of the same text.

Cross-tokenizer distillation can only compare the two models where their predictions are about the same
bytes. Both tokenizations are laid on the text's byte axis (each token spans `len(token_bytes)` bytes); a
*chunk boundary* is a byte offset where both sequences end a token. Between two consecutive boundaries each
side holds a contiguous run of tokens spelling exactly the same bytes, so the chunk's likelihood is the
product of its tokens' probabilities on either side and the two are directly comparable (ALM), and the
positions just before a boundary predict the same next bytes on both sides (ULD, MinED, hidden-state losses).

Details that matter:
- SentencePiece's dummy prefix (`Vocab.adds_prefix_space`): the first text token's leading space is not in the
  text, so one byte is removed from it. Assumes every sequence is the tokenization of a text *from its start*
  (after any leading specials). Callers that know better (a chat turn cut out of one tokenized conversation,
  `distill.tokenize.map_to_text`) say per sequence whether the first text token carries a phantom space
  (`align_batch(..., phantom=...)`).
- Specials have zero length. A special on one side is paired with a special on the other side with the same
  role (or, without a role, the same literal text) at the same byte offset; each pair is its own chunk, placed
  after the text chunk that ends at that offset. Specials without a counterpart belong to no chunk (masked
  out).
- BOS is never paired (the role "bos" is no pairing key): packing puts one before every document,
  mid-sequence, where the model never sees one at use, and its likelihood says nothing about the text. An id
  holding several roles (GPT-2's <|endoftext|> is bos, eos and unk) still pairs through its other roles.
- Truncation and padding: boundaries are only taken up to the bytes *both* sides cover, so a chunk is complete
  on both sides or absent. With `check_bytes` (default) the two byte strings are also compared and boundaries
  stop at the first byte where they differ (e.g. a normalizer rewrote the text on one side).
- Byte-fallback, whitespace runs, emoji need no special case: a multibyte character split into byte tokens on
  one side simply has no shared boundary inside it.

Representation: every token carries the index of its chunk (`*_chunk_index`, -1 = none). Each token is in at
most one chunk, so this index is a lossless encoding of the boolean token x chunk matrix; it costs O(B*T)
instead of O(B*T*C) and turns the chunk-sum matmul into a scatter-add. The dense matrices are materialised on
demand (`teacher_token_to_chunk`, `student_token_to_chunk`).
"""

from __future__ import annotations

import weakref
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from transplant.tokenizers.vocab import TokenKind, Vocab

WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"
_WHITESPACE_CODES = np.frombuffer(WHITESPACE_BYTES, dtype=np.uint8)
BOUNDARY_BYTES = b" \t\n"  # the reference ALM's "space+tab+newline(+special)" unit ends
_BOUNDARY_CODES = np.frombuffer(BOUNDARY_BYTES, dtype=np.uint8)
UNPAIRED_ROLES = frozenset({"bos"})  # roles that never make two specials a chunk (see the module docstring)


@dataclass
class VocabTables:
    """Per-vocabulary numpy lookups, built once (the per-sequence work is then pure fancy indexing)."""

    lengths: np.ndarray  # int64 [V]: bytes per token (0 for specials)
    is_special: np.ndarray  # bool [V]
    starts_with_space: np.ndarray  # bool [V]: first byte is b" " (candidate carrier of the dummy prefix)
    special_keys: dict[int, frozenset[str]]  # special id -> pairing keys ("role:bos", "text:<|im_start|>")
    token_bytes: list[bytes]  # b"" for specials whatever the vocab says
    adds_prefix_space: bool
    pad_id: int


_TABLES: dict[int, tuple[weakref.ref, int, VocabTables]] = {}


def vocab_tables(vocab: Vocab) -> VocabTables:
    cached = _TABLES.get(id(vocab))
    if cached is not None and cached[0]() is vocab and cached[1] == len(vocab):
        return cached[2]
    is_special = np.fromiter((k is TokenKind.SPECIAL for k in vocab.kinds), dtype=bool, count=len(vocab))
    lengths = np.fromiter(map(len, vocab.token_bytes), dtype=np.int64, count=len(vocab))
    lengths[is_special] = 0
    starts_with_space = np.fromiter((b[:1] == b" " for b in vocab.token_bytes), dtype=bool, count=len(vocab))
    keys: dict[int, set[str]] = defaultdict(set)
    for idx, text in vocab.special_texts.items():
        keys[int(idx)].add(f"text:{text}")
    for role, idx in vocab.roles.items():  # one id may hold several roles (GPT-2: bos = eos = unk)
        keys[int(idx)].add(f"role:{role}")
    bos = vocab.roles.get("bos")
    # BOS pairs with nothing: drop its role key and, unless another role names it, its text
    if bos is not None:
        keys[int(bos)] = {k for k in keys[int(bos)] if k.startswith("role:") and k[5:] not in UNPAIRED_ROLES}
    keys = {i: frozenset(k) for i, k in keys.items() if 0 <= i < len(vocab) and is_special[i] and k}
    pad_id = vocab.roles.get("pad", vocab.roles.get("eos", 0))
    text_bytes = [b"" if special else piece for piece, special in zip(vocab.token_bytes, is_special.tolist())]
    tables = VocabTables(lengths, is_special, starts_with_space & ~is_special, keys, text_bytes,
                          bool(vocab.adds_prefix_space), int(pad_id))
    _TABLES[id(vocab)] = (weakref.ref(vocab), len(vocab), tables)
    return tables


def boundary_mask(vocab: Vocab) -> torch.Tensor:
    """Bool [V]: tokens that can only follow a finished unit: first byte space, tab or newline, or a special.

    The reference ALM's debiasing event ("space+tab+newline+special"): P(next token in this set) is what both
    models append to a unit's likelihood, so that "Hell" + "o" and "Hello" both mean "the word Hello, ended".
    Unlike `word_start_mask`, specials count (end of text ends the unit) and \\r, \\v, \\f do not.
    """
    first = np.fromiter((b[0] if b else 256 for b in vocab.token_bytes), dtype=np.int64, count=len(vocab))
    return torch.from_numpy(np.isin(first, _BOUNDARY_CODES) | vocab_tables(vocab).is_special)


def word_start_mask(vocab: Vocab) -> torch.Tensor:
    """Bool [V]: tokens whose first byte is ASCII whitespace (`WHITESPACE_BYTES`), byte-fallback included.

    This is the event "the next token begins a new word" used to debias chunk likelihoods: after a chunk that
    is followed by whitespace in the text, both models must put their next token in this set, whatever their
    segmentation of the following word. Specials are never in it.
    """
    first = np.fromiter((b[0] if b else 256 for b in vocab.token_bytes), dtype=np.int64, count=len(vocab))
    mask = np.isin(first, _WHITESPACE_CODES) & ~vocab_tables(vocab).is_special
    return torch.from_numpy(mask)


class Offsets(NamedTuple):
    starts: np.ndarray  # int64 [T]: text byte offset where each token starts
    ends: np.ndarray  # int64 [T]
    special: np.ndarray  # bool [T]
    text: bytes  # the bytes the sequence spells (dummy prefix removed)


def text_offsets(ids: np.ndarray, tables: VocabTables, phantom: bool | None = None) -> Offsets:
    """Byte spans of `ids` read as a text from its start. `phantom`: whether the first text token's leading
    space is not text (None: the vocabulary's dummy prefix rule)."""
    lengths = tables.lengths[ids]
    special = tables.is_special[ids]
    text = b"".join(map(tables.token_bytes.__getitem__, ids.tolist()))
    if phantom if phantom is not None else tables.adds_prefix_space:
        first_text = np.flatnonzero(~special)
        if first_text.size and tables.starts_with_space[ids[first_text[0]]]:
            lengths[first_text[0]] -= 1
            text = text[1:]
    ends = np.cumsum(lengths)
    return Offsets(ends - lengths, ends, special, text)


def _common_prefix(a: bytes, b: bytes, limit: int) -> int:
    if limit <= 0 or a[:limit] == b[:limit]:
        return max(limit, 0)
    diff = np.frombuffer(a, np.uint8, limit) != np.frombuffer(b, np.uint8, limit)
    return int(np.argmax(diff))


def shared_limit(t: Offsets, s: Offsets, check_bytes: bool) -> int:
    limit = min(int(t.ends[-1]) if t.ends.size else 0, int(s.ends[-1]) if s.ends.size else 0)
    return _common_prefix(t.text, s.text, limit) if check_bytes else limit


def shared_boundaries(t: Offsets, s: Offsets, limit: int) -> np.ndarray:
    """Sorted byte offsets (> 0, <= limit) where both sides end a non-empty token."""
    t_ends = t.ends[t.ends > t.starts]  # strictly increasing, hence unique
    s_ends = s.ends[s.ends > s.starts]
    shared = np.intersect1d(t_ends, s_ends, assume_unique=True)
    return shared[shared <= limit]


def _pair_specials(t_ids, s_ids, t: Offsets, s: Offsets, tt: VocabTables, st: VocabTables, limit: int):
    """(offset, teacher pos, student pos) for specials sharing a key at the same byte offset, in order."""
    t_pos, s_pos = np.flatnonzero(t.special), np.flatnonzero(s.special)
    if not t_pos.size or not s_pos.size:
        return []
    waiting: dict[tuple[str, int], deque] = defaultdict(deque)
    for p in s_pos.tolist():
        for key in sorted(st.special_keys.get(int(s_ids[p]), ())):
            waiting[(key, int(s.starts[p]))].append(p)
    pairs, used = [], set()
    for p in t_pos.tolist():
        offset = int(t.starts[p])
        if offset > limit:
            break
        for key in sorted(tt.special_keys.get(int(t_ids[p]), ())):
            queue = waiting.get((key, offset))
            while queue and queue[0] in used:
                queue.popleft()
            if queue:
                used.add(queue[0])
                pairs.append((offset, p, queue.popleft()))
                break
    return pairs


class _OneAlignment(NamedTuple):
    teacher_chunk: np.ndarray  # int64 [Tt], -1 = none
    student_chunk: np.ndarray  # int64 [Ts]
    byte_start: np.ndarray  # int64 [C]
    byte_end: np.ndarray
    is_special: np.ndarray  # bool [C]
    followed_by_whitespace: np.ndarray  # bool [C]


def _next_bytes(text_a: bytes, text_b: bytes, offsets: np.ndarray) -> np.ndarray:
    """The text byte at each offset where at least one side covers it and the sides agree, else -1."""
    values = []
    for text in (text_a, text_b):
        arr = np.frombuffer(text, np.uint8).astype(np.int64)
        value = np.full(offsets.shape, -1, dtype=np.int64)
        inside = offsets < arr.size
        value[inside] = arr[offsets[inside]]
        values.append(value)
    a, b = values
    return np.where(a == -1, b, np.where((b == -1) | (b == a), a, -1))


def _align_one(t_ids: np.ndarray, s_ids: np.ndarray, tt: VocabTables, st: VocabTables,
               check_bytes: bool, phantom: tuple[bool | None, bool | None] = (None, None)) -> _OneAlignment:
    t, s = text_offsets(t_ids, tt, phantom[0]), text_offsets(s_ids, st, phantom[1])
    limit = shared_limit(t, s, check_bytes)
    bounds = shared_boundaries(t, s, limit)
    n_text = bounds.size
    pairs = _pair_specials(t_ids, s_ids, t, s, tt, st, limit)
    special_offsets = np.array([p[0] for p in pairs], dtype=np.int64)
    # Chunk order on the byte axis: the text chunk ending at b sorts before specials sitting at offset b.
    keys = np.concatenate([2 * bounds, 2 * special_offsets + 1])
    order = np.argsort(keys, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)

    def token_chunks(off: Offsets, special_positions: list[int]) -> np.ndarray:
        # A non-special token starting at `start` is in the text chunk (bounds[k-1], bounds[k]] with
        # k = #bounds <= start (no shared boundary can fall strictly inside a token).
        k = np.searchsorted(bounds, off.starts, side="right")
        chunk = np.where((k < n_text) & ~off.special,
                         rank[np.minimum(k, max(n_text - 1, 0))] if n_text else -1, -1)
        if special_positions:
            chunk[np.asarray(special_positions)] = rank[n_text:]
        return chunk.astype(np.int64)

    teacher_chunk = token_chunks(t, [p[1] for p in pairs])
    student_chunk = token_chunks(s, [p[2] for p in pairs])
    byte_end = np.concatenate([bounds, special_offsets])[order]
    byte_start = np.concatenate([np.concatenate([[0], bounds[:-1]]) if n_text else bounds,
                                 special_offsets])[order]
    is_special = np.concatenate([np.zeros(n_text, bool), np.ones(len(pairs), bool)])[order]
    following = _next_bytes(t.text, s.text, byte_end)
    followed_by_ws = np.isin(following, _WHITESPACE_CODES) & ~is_special
    return _OneAlignment(teacher_chunk, student_chunk, byte_start, byte_end, is_special, followed_by_ws)


@dataclass
class ChunkAlignment:
    """A padded batch of teacher/student sequences and their chunk alignment (all torch tensors, CPU).

    B = batch, Tt/Ts = padded teacher/student length, C = chunks (max over the batch, or `max_chunks`).
    Token positions are indices into the padded sequences; chunk-level position tensors hold 0 where
    `chunk_mask` is False.
    """

    teacher_input_ids: torch.Tensor  # long [B, Tt], padded with the teacher's pad (or eos) id
    student_input_ids: torch.Tensor  # long [B, Ts]
    teacher_attention_mask: torch.Tensor  # long [B, Tt]
    student_attention_mask: torch.Tensor  # long [B, Ts]
    teacher_chunk_index: torch.Tensor  # long [B, Tt]: chunk of each token, -1 = in no chunk
    student_chunk_index: torch.Tensor  # long [B, Ts]
    chunk_mask: torch.Tensor  # bool [B, C]: chunk exists and is complete on both sides
    chunk_is_special: torch.Tensor  # bool [B, C]: a paired special (bos<->bos, ...), zero bytes
    chunk_byte_start: torch.Tensor  # long [B, C]: text byte span [start, end)
    chunk_byte_end: torch.Tensor  # long [B, C]
    chunk_followed_by_whitespace: torch.Tensor  # bool [B, C]: the text byte right after the chunk is
    #                                             whitespace
    teacher_chunk_first: torch.Tensor  # long [B, C]: position of the chunk's first teacher token
    teacher_chunk_last: torch.Tensor  # long [B, C]: position of its last teacher token
    student_chunk_first: torch.Tensor  # long [B, C]
    student_chunk_last: torch.Tensor  # long [B, C]

    @property
    def num_chunks(self) -> int:
        return self.chunk_mask.shape[1]

    @property
    def teacher_token_to_chunk(self) -> torch.Tensor:
        """Bool [B, Tt, C]: token t is in chunk c (dense form of `teacher_chunk_index`)."""
        return _one_hot(self.teacher_chunk_index, self.num_chunks)

    @property
    def student_token_to_chunk(self) -> torch.Tensor:
        """Bool [B, Ts, C]."""
        return _one_hot(self.student_chunk_index, self.num_chunks)

    def to(self, device: torch.device | str) -> ChunkAlignment:
        return ChunkAlignment(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(*index.shape, n + 1, dtype=torch.bool, device=index.device)
    out.scatter_(-1, torch.where(index < 0, n, index).unsqueeze(-1), True)
    return out[..., :n]


def chunk_spans(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk, the first and last token position carrying that chunk index."""
    batch, length = index.shape
    slot = torch.where(index < 0, n, index)
    positions = torch.arange(length).expand(batch, length)
    first = torch.full((batch, n + 1), length, dtype=torch.long).scatter_reduce(1, slot, positions, "amin")
    last = torch.full((batch, n + 1), -1, dtype=torch.long).scatter_reduce(1, slot, positions, "amax")
    return first[:, :n], last[:, :n]


def align_batch(teacher_ids: list[list[int]], student_ids: list[list[int]], teacher_vocab: Vocab,
                student_vocab: Vocab, max_chunks: int | None = None, *, check_bytes: bool = True,
                phantom: Sequence[tuple[bool | None, bool | None]] | None = None) -> ChunkAlignment:
    """Pad a batch of paired tokenizations and compute their chunk alignment.

    Each `teacher_ids[i]` / `student_ids[i]` must tokenize the same text from its start (as
    `distill.tokenize.tokenize_pair` produces; truncation at different lengths is fine). `max_chunks` fixes C
    (extra chunks are dropped, fewer are padded) for static shapes. `phantom[i]` = (teacher, student): whether
    that sequence's first text token carries a leading space that is not text (None: the vocabulary's dummy
    prefix rule). The work is one vectorised numpy pass per sequence (no per-token Python).
    """
    if len(teacher_ids) != len(student_ids):
        raise ValueError(f"batch sizes differ: {len(teacher_ids)} teacher vs {len(student_ids)} "
                         "student sequences")
    tt, st = vocab_tables(teacher_vocab), vocab_tables(student_vocab)
    flags = list(phantom) if phantom is not None else [(None, None)] * len(teacher_ids)
    ones = [_align_one(np.asarray(t, dtype=np.int64), np.asarray(s, dtype=np.int64), tt, st,
                       check_bytes, flag)
            for t, s, flag in zip(teacher_ids, student_ids, flags)]
    batch = len(ones)
    t_len = max((len(t) for t in teacher_ids), default=0)
    s_len = max((len(s) for s in student_ids), default=0)
    n_chunks = max_chunks if max_chunks is not None else max((o.byte_end.size for o in ones), default=0)

    t_ids = np.full((batch, t_len), tt.pad_id, dtype=np.int64)
    s_ids = np.full((batch, s_len), st.pad_id, dtype=np.int64)
    t_mask, s_mask = np.zeros((batch, t_len), np.int64), np.zeros((batch, s_len), np.int64)
    t_chunk, s_chunk = np.full((batch, t_len), -1, np.int64), np.full((batch, s_len), -1, np.int64)
    chunk_cols = {name: np.zeros((batch, n_chunks), dtype) for name, dtype in
                  [("mask", bool), ("special", bool), ("start", np.int64), ("end", np.int64), ("ws", bool)]}
    for row, (one, t, s) in enumerate(zip(ones, teacher_ids, student_ids)):
        t_ids[row, :len(t)], s_ids[row, :len(s)] = t, s
        t_mask[row, :len(t)], s_mask[row, :len(s)] = 1, 1
        t_chunk[row, :len(t)] = np.where(one.teacher_chunk < n_chunks, one.teacher_chunk, -1)
        s_chunk[row, :len(s)] = np.where(one.student_chunk < n_chunks, one.student_chunk, -1)
        kept = min(one.byte_end.size, n_chunks)
        chunk_cols["mask"][row, :kept] = True
        chunk_cols["special"][row, :kept] = one.is_special[:kept]
        chunk_cols["start"][row, :kept] = one.byte_start[:kept]
        chunk_cols["end"][row, :kept] = one.byte_end[:kept]
        chunk_cols["ws"][row, :kept] = one.followed_by_whitespace[:kept]

    t_chunk_t, s_chunk_t = torch.from_numpy(t_chunk), torch.from_numpy(s_chunk)
    mask = torch.from_numpy(chunk_cols["mask"])
    t_first, t_last = chunk_spans(t_chunk_t, n_chunks)
    s_first, s_last = chunk_spans(s_chunk_t, n_chunks)
    zero = torch.zeros((), dtype=torch.long)
    return ChunkAlignment(
        teacher_input_ids=torch.from_numpy(t_ids), student_input_ids=torch.from_numpy(s_ids),
        teacher_attention_mask=torch.from_numpy(t_mask), student_attention_mask=torch.from_numpy(s_mask),
        teacher_chunk_index=t_chunk_t, student_chunk_index=s_chunk_t, chunk_mask=mask,
        chunk_is_special=torch.from_numpy(chunk_cols["special"]),
        chunk_byte_start=torch.from_numpy(chunk_cols["start"]),
        chunk_byte_end=torch.from_numpy(chunk_cols["end"]),
        chunk_followed_by_whitespace=torch.from_numpy(chunk_cols["ws"]),
        teacher_chunk_first=torch.where(mask, t_first, zero),
        teacher_chunk_last=torch.where(mask, t_last, zero),
        student_chunk_first=torch.where(mask, s_first, zero),
        student_chunk_last=torch.where(mask, s_last, zero),
    )


class TokenizedPair(NamedTuple):
    teacher_ids: list[int]
    student_ids: list[int]
    num_bytes: int  # text bytes both sequences cover


def _cut(ids: list[int], off: Offsets, cut: int) -> list[int]:
    """Keep the prefix up to the last non-empty token ending at or before `cut` (leading specials kept)."""
    nonempty = np.flatnonzero((off.ends > off.starts) & (off.ends <= cut))
    if nonempty.size:
        return ids[: int(nonempty[-1]) + 1]
    first_text = np.flatnonzero(off.ends > off.starts)
    return ids[: int(first_text[0])] if first_text.size else ids


def cut_pair(teacher_ids: list[int], student_ids: list[int], teacher_vocab: Vocab, student_vocab: Vocab,
             max_length: tuple[int, int],
             phantom: tuple[bool | None, bool | None] = (None, None)) -> TokenizedPair:
    """Truncate two tokenizations of the same text (from its start) to their lengths, then back to the last
    byte offset where both end a token, so that no chunk is left half-covered."""
    tt, st = vocab_tables(teacher_vocab), vocab_tables(student_vocab)
    t_ids, s_ids = list(teacher_ids[: max_length[0]]), list(student_ids[: max_length[1]])
    t = text_offsets(np.asarray(t_ids, np.int64), tt, phantom[0])
    s = text_offsets(np.asarray(s_ids, np.int64), st, phantom[1])
    bounds = shared_boundaries(t, s, shared_limit(t, s, check_bytes=True))
    limit = int(bounds[-1]) if bounds.size else 0
    return TokenizedPair(_cut(t_ids, t, limit), _cut(s_ids, s, limit), limit)


def tokenize_pair(text: str, teacher_vocab: Vocab, student_vocab: Vocab, max_length: int | tuple[int, int], *,
                  add_bos: bool = True, add_eos: bool = False) -> TokenizedPair:
    """Tokenize `text` with both vocabularies so that both sequences cover exactly the same bytes.

    Each side gets its own bos (when `add_bos` and it has one) and is truncated to its `max_length`; then both
    are cut back to the last byte offset where both end a token, so no chunk is left half-covered. eos is
    appended (when `add_eos`, room permits and the whole text fits on both sides).
    """
    t_max, s_max = (max_length, max_length) if isinstance(max_length, int) else max_length
    tt, st = vocab_tables(teacher_vocab), vocab_tables(student_vocab)
    # No token spans more than max(lengths) bytes, so characters beyond this bound cannot be reached.
    reach = max(t_max * int(tt.lengths.max(initial=1)), s_max * int(st.lengths.max(initial=1))) + 1024
    clipped = text[:reach]
    sides = []
    for vocab, limit in ((teacher_vocab, t_max), (student_vocab, s_max)):
        bos = vocab.roles.get("bos") if add_bos else None
        ids = ([bos] if bos is not None else []) + vocab.encode(clipped, add_special_tokens=False)
        sides.append((ids, len(ids) <= limit))
    (t_ids, t_whole), (s_ids, s_whole) = sides
    if t_whole and s_whole and len(clipped) == len(text):
        t, s = text_offsets(np.asarray(t_ids, np.int64), tt), text_offsets(np.asarray(s_ids, np.int64), st)
        if t.text == s.text:
            if add_eos:
                t_eos, s_eos = teacher_vocab.roles.get("eos"), student_vocab.roles.get("eos")
                if t_eos is not None and s_eos is not None and len(t_ids) < t_max and len(s_ids) < s_max:
                    t_ids, s_ids = t_ids + [t_eos], s_ids + [s_eos]
            return TokenizedPair(t_ids, s_ids, len(t.text))
    return cut_pair(t_ids, s_ids, teacher_vocab, student_vocab, (t_max, s_max))
