"""Training text for distillation: documents -> packed windows tokenized by BOTH tokenizers -> aligned
batches.

Why it is shaped this way:
- Teacher and student must read the same bytes, so a window is cut by `chunks.tokenize_pair` at a byte offset
  where both tokenizations end a token, and each side is at most `max_length` tokens.
- `chunks.align_batch` assumes every sequence is the tokenization of a text from its start. A packed window
  holds several pieces (documents, document continuations, chat turns), so each piece is aligned on its own
  and the alignments are stitched together (`stitch`): token positions and chunk ids are offset, first/last
  chunk positions recomputed with one scatter over the whole batch. Each document starts with BOS, which is in
  no chunk (`distill.chunks`): it is an artefact of packing, not text.
- Chat conversations are rendered with each side's own template and tokenized once per side; message contents
  are found by byte offsets and become the shared pieces (`distill.chat.conversation_pieces`).
- Documents come from a lazy `distill.corpus.Corpus` (files are scanned once, read block by block).
- Iteration is a pure function of (seed, epoch, position): the loader's state is four integers, saved with
  each checkpoint, so a resumed run sees exactly the windows the uninterrupted run would have seen. With
  several ranks, a one-off pass on rank 0 records where every window of the run starts (`WindowIndex`, shared
  through a file); each rank then packs, tokenizes and aligns only its own windows, starting each from its
  recorded state.
Attention is not masked between packed documents (standard packing).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.chat import CHAT_MODES, Piece, conversation_pieces
from distill.chunks import ChunkAlignment, align_batch, chunk_spans, tokenize_pair
from distill.corpus import DOC_BYTES, Corpus, open_corpus, split_text
from transplant.errors import TransplantError
from transplant.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)

MIN_ROOM = 8  # a window with fewer free tokens than this on either side is closed
__all__ = ["DOC_BYTES", "DistillLoader", "MIN_ROOM", "Packer", "PackerState", "Piece", "WindowIndex",
           "read_documents", "split_text", "stitch"]


def read_documents(sources: list[str], *, corpus_bytes: int = 2_000_000) -> list[Any]:
    """Every document (str, or a list of chat messages) of `sources`, in order, as a list (small corpora,
    tests; training reads them lazily through `distill.corpus.open_corpus`)."""
    return list(open_corpus(sources, corpus_bytes=corpus_bytes))


# ---------------------------------------------------------------------------------------------------- packing
Window = list[Piece]


@dataclass
class PackerState:
    epoch: int = 0
    doc_pos: int = 0  # index into the epoch's permutation
    char_offset: int = 0  # where the current document continues
    windows: int = 0  # windows produced so far (all ranks together)


class Packer:
    """Deterministic stream of windows over shuffled documents; `state` fully describes its position, and
    `next_window` is a pure function of it."""

    def __init__(self, documents: Corpus | list[Any], teacher: Vocab, student: Vocab, *, max_length: int,
                 seed: int = 0, shuffle: bool = True, pack: bool = True, chat_template: str = "auto",
                 stratify: bool = False):
        if chat_template not in CHAT_MODES:
            raise TransplantError(f"data.chat_template={chat_template!r} is unknown; choose one "
                                  f"of {CHAT_MODES}")
        if max_length < 2 * MIN_ROOM:
            raise TransplantError(f"data.max_length={max_length} is too short; use at least {2 * MIN_ROOM}")
        self.corpus = documents if isinstance(documents, Corpus) else Corpus.from_documents(documents)
        self.teacher, self.student = teacher, student
        self.max_length, self.seed, self.shuffle, self.pack = max_length, seed, shuffle, pack
        self.stratify = stratify
        self.chat_template = chat_template
        self.state = PackerState()

    def _current(self) -> Any:
        if self.state.doc_pos >= len(self.corpus):
            self.state.epoch += 1
            self.state.doc_pos, self.state.char_offset = 0, 0
            log.info("data: starting epoch %d", self.state.epoch)
        state = self.state
        return self.corpus.document(self.seed, state.epoch, state.doc_pos, self.shuffle, self.stratify)

    def _next_doc(self) -> None:
        self.state.doc_pos += 1
        self.state.char_offset = 0

    def _text_piece(self, text: str, room: tuple[int, int]) -> Piece | None:
        rest = text[self.state.char_offset:]
        pair = tokenize_pair(rest, self.teacher, self.student, room, add_bos=True, add_eos=True)
        if pair.num_bytes == 0:
            return None
        rest_bytes = rest.encode("utf-8")
        if pair.num_bytes >= len(rest_bytes):
            self._next_doc()
        else:  # a cut inside a multibyte character drops the rest of that character (both sides end there)
            self.state.char_offset += len(rest_bytes[: pair.num_bytes].decode("utf-8", errors="ignore"))
        return Piece(pair.teacher_ids, pair.student_ids, True)

    def next_window(self) -> Window:
        window: Window = []
        used_t = used_s = 0
        skipped = 0
        while True:
            room = (self.max_length - used_t, self.max_length - used_s)
            if min(room) < MIN_ROOM or (window and not self.pack):
                break
            if skipped > 10_000:
                raise TransplantError("no usable text in 10,000 tries: teacher and student "
                                      "tokenizations never share a byte boundary, or the documents are "
                                      "empty; check data.train")
            doc = self._current()
            if isinstance(doc, list):
                pieces, whole = conversation_pieces(doc, self.teacher, self.student, self.chat_template, room,
                                                    MIN_ROOM)
                if window and not whole:
                    break  # conversations are kept whole when they fit: this one starts the next window
                self._next_doc()
                if not pieces:
                    skipped += 1
                    continue
            else:
                start_doc = (self.state.epoch, self.state.doc_pos)
                piece = self._text_piece(doc, room)
                if piece is None:
                    if window:
                        break
                    # The two tokenizations share no boundary here (e.g. different normalisation): skip a
                    # line.
                    rest = doc[self.state.char_offset:]
                    cut = rest.find("\n") + 1 or min(len(rest), 64) or 1
                    self.state.char_offset += cut
                    if self.state.char_offset >= len(doc):
                        self._next_doc()
                    skipped += 1
                    continue
                pieces = [piece]
                if (self.state.epoch, self.state.doc_pos) == start_doc:  # document continues: window is full
                    window.extend(pieces)
                    break
            window.extend(pieces)
            used_t += sum(len(p.teacher_ids) for p in pieces)
            used_s += sum(len(p.student_ids) for p in pieces)
        if skipped:
            log.warning("data: skipped %d unalignable spans while packing", skipped)
        self.state.windows += 1
        return window

# ---------------------------------------------------------------------------------------------------- batches
def _pad_id(vocab: Vocab) -> int:
    for role in ("pad", "eos"):
        if vocab.roles.get(role) is not None:
            return int(vocab.roles[role])
    return 0


def stitch(windows: list[Window], teacher: Vocab, student: Vocab) -> ChunkAlignment:
    """One `ChunkAlignment` for a batch of windows: aligned pieces go through a single `align_batch` call;
    their rows are laid end to end per window (markup pieces get chunk index -1)."""
    aligned = [p for w in windows for p in w if p.aligned]
    pieces_alignment = align_batch([p.teacher_ids
                                    for p in aligned], [p.student_ids for p in aligned], teacher,
                                   student, phantom=[(p.teacher_phantom, p.student_phantom) for p in aligned]
                                   ) if aligned else None
    n_chunks_of = pieces_alignment.chunk_mask.sum(1).tolist() if aligned else []
    t_len = max((sum(len(p.teacher_ids) for p in w) for w in windows), default=0)
    s_len = max((sum(len(p.student_ids) for p in w) for w in windows), default=0)
    c_len = max(max((sum(n_chunks_of[j] for j in _aligned_rows(windows, k)) for k in range(len(windows))),
                    default=0), 1)
    batch = len(windows)
    out = {
        "teacher_input_ids": torch.full((batch, t_len), _pad_id(teacher), dtype=torch.long),
        "student_input_ids": torch.full((batch, s_len), _pad_id(student), dtype=torch.long),
        "teacher_attention_mask": torch.zeros(batch, t_len, dtype=torch.long),
        "student_attention_mask": torch.zeros(batch, s_len, dtype=torch.long),
        "teacher_chunk_index": torch.full((batch, t_len), -1, dtype=torch.long),
        "student_chunk_index": torch.full((batch, s_len), -1, dtype=torch.long),
    }
    chunk_cols = {"chunk_mask": torch.bool, "chunk_is_special": torch.bool, "chunk_byte_start": torch.long,
                  "chunk_byte_end": torch.long, "chunk_followed_by_whitespace": torch.bool}
    out.update({name: torch.zeros(batch, c_len, dtype=dtype) for name, dtype in chunk_cols.items()})
    row = 0
    for b, window in enumerate(windows):
        t_pos = s_pos = c_pos = byte_pos = 0
        for piece in window:
            nt, ns = len(piece.teacher_ids), len(piece.student_ids)
            out["teacher_input_ids"][b, t_pos:t_pos + nt] = torch.tensor(piece.teacher_ids, dtype=torch.long)
            out["student_input_ids"][b, s_pos:s_pos + ns] = torch.tensor(piece.student_ids, dtype=torch.long)
            out["teacher_attention_mask"][b, t_pos:t_pos + nt] = 1
            out["student_attention_mask"][b, s_pos:s_pos + ns] = 1
            if piece.aligned:
                a, nc = pieces_alignment, n_chunks_of[row]
                t_idx, s_idx = a.teacher_chunk_index[row, :nt], a.student_chunk_index[row, :ns]
                out["teacher_chunk_index"][b, t_pos:t_pos + nt] = torch.where(t_idx >= 0, t_idx + c_pos, -1)
                out["student_chunk_index"][b, s_pos:s_pos + ns] = torch.where(s_idx >= 0, s_idx + c_pos, -1)
                for name in chunk_cols:
                    value = getattr(a, name)[row, :nc]
                    if name in ("chunk_byte_start", "chunk_byte_end"):
                        value = value + byte_pos
                    out[name][b, c_pos:c_pos + nc] = value
                if nc:
                    byte_pos = int(out["chunk_byte_end"][b, c_pos + nc - 1])
                c_pos += nc
                row += 1
            t_pos, s_pos = t_pos + nt, s_pos + ns
    mask = out["chunk_mask"]
    zero = torch.zeros((), dtype=torch.long)
    for prefix in ("teacher", "student"):
        first, last = chunk_spans(out[f"{prefix}_chunk_index"], c_len)
        out[f"{prefix}_chunk_first"] = torch.where(mask, first, zero)
        out[f"{prefix}_chunk_last"] = torch.where(mask, last, zero)
    return ChunkAlignment(**out)


def _aligned_rows(windows: list[Window], k: int) -> range:
    start = sum(p.aligned for w in windows[:k] for p in w)
    return range(start, start + sum(p.aligned for p in windows[k]))


class WindowIndex:
    """Where windows 0..n start: the packer state before each (int64 [n + 1, 4]: epoch, doc_pos, char_offset,
    windows), recorded by one dry run of the packer (which tokenizes but does not align).

    With it, a rank packs window k by setting the packer to `state(k)`: since `next_window` is a pure function
    of the state, that is exactly the window a sequential pass would produce, so N ranks see what one rank
    with N times the accumulation sees while each tokenizes only its own windows."""

    def __init__(self, states: np.ndarray, fingerprint: str = ""):
        self.states, self.fingerprint = np.asarray(states, dtype=np.int64).reshape(-1, 4), fingerprint

    def __len__(self) -> int:
        return max(self.states.shape[0] - 1, 0)  # windows covered

    def state(self, k: int) -> PackerState:
        if k >= self.states.shape[0]:
            raise TransplantError(f"the window index covers {len(self)} windows but window {k} "
                                  "was asked for; delete the index file so that it is rebuilt for this run")
        return PackerState(*map(int, self.states[k]))

    def extend(self, packer: Packer, n: int) -> WindowIndex:
        """This index grown to at least `n` windows by dry-running `packer` from the last recorded state."""
        rows = [self.states] if self.states.size else [np.asarray([astuple(PackerState())], np.int64)]
        packer.state = PackerState(*map(int, rows[0][-1]))
        extra = []
        for _ in range(n - (rows[0].shape[0] - 1)):
            packer.next_window()
            extra.append(astuple(packer.state))
        if extra:
            rows.append(np.asarray(extra, np.int64))
        return WindowIndex(np.concatenate(rows), self.fingerprint)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "states": self.states.tolist()}))
        os.replace(tmp, path)  # readers see the old index or the new one, never half of one

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> WindowIndex:
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fingerprint:
                return cls(np.asarray(data["states"], np.int64), fingerprint)
        return cls(np.zeros((0, 4), np.int64), fingerprint)


def shared_window_index(packer: Packer, n: int, path: Path, fingerprint: str, is_main: bool,
                        barrier: Callable[[], None]) -> WindowIndex:
    """The index of the run's first `n` windows: rank 0 builds (or extends, or reuses) it and writes it to
    `path`; the other ranks wait at `barrier` and read it. The packer is left at window 0."""
    if is_main:
        index = WindowIndex.load(path, fingerprint)
        if len(index) < n:
            log.info("data: recording the start of %d windows (one-off pass)", n)
            index = index.extend(packer, n)
            path.parent.mkdir(parents=True, exist_ok=True)
            index.save(path)
    barrier()
    if not is_main:
        index = WindowIndex.load(path, fingerprint)
    packer.state = PackerState()
    return index


class DistillLoader:
    """Micro-batches for one rank: global step s uses windows [s*G, (s+1)*G) of the packer's stream
    (G = micro_batch * grad_accum * world); micro-batch j of rank r takes the (j*world + r)-th slice of size
    micro_batch, so a run on N ranks sees exactly what one rank with N times the accumulation would. With a
    `WindowIndex` a rank packs only its own windows; without one it packs all G and keeps its share.

    With `prefetch`, the next step's batches are built in a background thread while the current step computes
    (tokenizers and numpy release the GIL); `state_dict` always describes the batches already handed out.
    """

    def __init__(self, packer: Packer, *, micro_batch_size: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, prefetch: bool = False, index: WindowIndex | None = None):
        self.packer, self.micro_batch_size, self.grad_accum = packer, micro_batch_size, grad_accum
        self.rank, self.world_size, self.index = rank, world_size, index
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distill-data") if prefetch else None
        self._pending: Future | None = None
        self._consumed = dict(vars(packer.state))

    def _produce(self) -> tuple[list[ChunkAlignment], dict[str, int]]:
        size, total = self.micro_batch_size, self.micro_batch_size * self.grad_accum * self.world_size
        starts = [(j * self.world_size + self.rank) * size for j in range(self.grad_accum)]
        if self.index is None:
            windows = [self.packer.next_window() for _ in range(total)]
            mine = [windows[start:start + size] for start in starts]
        else:
            first = self.packer.state.windows
            mine = []
            for start in starts:
                mine.append([])
                for k in range(first + start, first + start + size):
                    self.packer.state = self.index.state(k)
                    mine[-1].append(self.packer.next_window())
            self.packer.state = self.index.state(first + total)
        batches = [stitch(windows, self.packer.teacher, self.packer.student) for windows in mine]
        return batches, dict(vars(self.packer.state))

    def step_batches(self) -> list[ChunkAlignment]:
        """The `grad_accum` micro-batches of this rank for the next optimizer step."""
        if self._pool is None:
            batches, state = self._produce()
        else:
            if self._pending is None:
                self._pending = self._pool.submit(self._produce)
            batches, state = self._pending.result()
            self._pending = self._pool.submit(self._produce)
        self._consumed = state
        return batches

    def __iter__(self) -> Iterator[list[ChunkAlignment]]:
        while True:
            yield self.step_batches()

    def state_dict(self) -> dict[str, int]:
        return dict(self._consumed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._pending is not None:  # it is mutating the packer: let it finish, then discard its batches
            self._pending.result()
            self._pending = None
        self.packer.state = PackerState(**{k: int(v) for k, v in state.items()})
        self._consumed = dict(vars(self.packer.state))
