"""Training text for distillation: documents -> packed windows tokenized by BOTH tokenizers -> aligned batches.

Why it is shaped this way:
- Teacher and student must read the same bytes, so a window is cut by `chunks.tokenize_pair` at a byte offset
  where both tokenizations end a token, and each side is at most `max_length` tokens.
- `chunks.align_batch` assumes every sequence is the tokenization of a text from its start (a SentencePiece
  dummy prefix is only handled on the first text token). A packed window holds several pieces (documents,
  document continuations, chat turns), so each piece is tokenized and aligned on its own and the alignments are
  stitched together (`stitch`): token positions and chunk ids are offset, first/last chunk positions recomputed
  with one scatter over the whole batch.
- Chat turns are rendered with each side's own template (markup differs between tokenizers, content does not):
  markup is tokenized per side and belongs to no chunk; the content is a shared, aligned piece.
- Iteration is a pure function of (seed, epoch, position): the loader's state is four integers, saved with each
  checkpoint, so a resumed run sees exactly the windows the uninterrupted run would have seen. Every rank runs
  the same packer and keeps its own share of each global batch (tokenization is cheap next to the forward).
Attention is not masked between packed documents (standard packing); each piece starts with BOS.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from distill.chat import CHAT_MODES, chat_markups
from distill.chunks import ChunkAlignment, align_batch, chunk_spans, tokenize_pair
from transplant.errors import TransplantError
from transplant.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)

DOC_BYTES = 4096  # long texts are split into ~4 KB documents at paragraph/line breaks (the unit of shuffling)
MIN_ROOM = 8  # a window with fewer free tokens than this on either side is closed


# ----------------------------------------------------------------------------------------------------- reading
def split_text(text: str, doc_bytes: int = DOC_BYTES) -> list[str]:
    """Cut a long text into documents of about `doc_bytes` at blank lines, else line ends (shuffle units)."""
    if len(text.encode("utf-8")) <= doc_bytes:
        return [text] if text else []
    pieces = re.split(r"(?<=\n\n)", text) if "\n\n" in text else text.splitlines(keepends=True)
    docs, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += len(piece.encode("utf-8"))
        if size >= doc_bytes:
            docs.append("".join(current))
            current, size = [], 0
    if current:
        docs.append("".join(current))
    return docs


def _read_jsonl(path: Path) -> list[Any]:
    docs: list[Any] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TransplantError(f"{path}:{number} is not valid JSON ({err.msg}); fix or remove the line") from err
            if isinstance(record, dict) and isinstance(record.get("messages"), list):
                docs.append([{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]])
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                docs.extend(split_text(record["text"]))
            else:
                raise TransplantError(f"{path}:{number} has neither a `text` string nor a `messages` list; "
                                      "give each line one of them")
    return docs


def read_documents(sources: list[str], *, corpus_bytes: int = 2_000_000) -> list[Any]:
    """Documents (str, or a list of chat messages) from files, folders and `texts:NAME` corpora, in order."""
    docs: list[Any] = []
    for source in sources:
        source = str(source)
        if source.startswith("texts:"):
            from transplant.assets import texts

            docs.extend(split_text(texts.train_text(source[len("texts:"):], corpus_bytes)))
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        elif path.is_file():
            files = [path]
        else:
            raise TransplantError(f"training data {source} does not exist; give .txt/.jsonl files, a folder "
                                  "of them, or texts:NAME")
        for file in files:
            if file.suffix == ".jsonl":
                docs.extend(_read_jsonl(file))
            else:
                docs.extend(split_text(file.read_text(encoding="utf-8")))
    if not docs:
        raise TransplantError(f"no training text found in {sources}; check data.train")
    return docs


# ----------------------------------------------------------------------------------------------------- packing
class Piece(NamedTuple):
    teacher_ids: list[int]
    student_ids: list[int]
    aligned: bool  # both sides spell the same bytes from a text start (else: side-specific markup, no chunks)


Window = list[Piece]


@dataclass
class PackerState:
    epoch: int = 0
    doc_pos: int = 0  # index into the epoch's permutation
    char_offset: int = 0  # where the current document continues
    windows: int = 0  # windows produced so far (all ranks together)


class Packer:
    """Deterministic stream of windows over shuffled documents; `state` fully describes its position."""

    def __init__(self, documents: list[Any], teacher: Vocab, student: Vocab, *, max_length: int, seed: int = 0,
                 shuffle: bool = True, pack: bool = True, chat_template: str = "auto"):
        if chat_template not in CHAT_MODES:
            raise TransplantError(f"data.chat_template={chat_template!r} is unknown; choose one of {CHAT_MODES}")
        if max_length < 2 * MIN_ROOM:
            raise TransplantError(f"data.max_length={max_length} is too short; use at least {2 * MIN_ROOM}")
        self.documents, self.teacher, self.student = documents, teacher, student
        self.max_length, self.seed, self.shuffle, self.pack = max_length, seed, shuffle, pack
        self.chat_template = chat_template
        self.state = PackerState()
        self._order_epoch, self._order = -1, np.arange(0)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.documents)
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _current(self) -> Any:
        order = self.order(self.state.epoch)
        if self.state.doc_pos >= len(order):
            self.state.epoch += 1
            self.state.doc_pos, self.state.char_offset = 0, 0
            order = self.order(self.state.epoch)
            log.info("data: starting epoch %d", self.state.epoch)
        return self.documents[int(order[self.state.doc_pos])]

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

    def _chat_pieces(self, messages: list[dict], room: tuple[int, int]) -> tuple[list[Piece], bool]:
        """A conversation cut to `room`: per-side markup pieces around shared content pieces; and whether it
        fitted whole."""
        t_markup, s_markup = chat_markups(messages, self.teacher, self.student, self.chat_template)
        pieces, t_left, s_left = [], room[0], room[1]
        for i in range(len(messages) + 1):
            t_ids = self.teacher.encode(t_markup[i], add_special_tokens=False) if t_markup[i] else []
            s_ids = self.student.encode(s_markup[i], add_special_tokens=False) if s_markup[i] else []
            if i == 0:
                t_bos, s_bos = self.teacher.roles.get("bos"), self.student.roles.get("bos")
                t_ids = ([t_bos] if t_bos is not None and t_ids[:1] != [t_bos] else []) + t_ids
                s_ids = ([s_bos] if s_bos is not None and s_ids[:1] != [s_bos] else []) + s_ids
            if len(t_ids) > t_left or len(s_ids) > s_left:
                return pieces, False
            if t_ids or s_ids:
                pieces.append(Piece(t_ids, s_ids, False))
                t_left, s_left = t_left - len(t_ids), s_left - len(s_ids)
            if i == len(messages):
                return pieces, True
            content = messages[i]["content"]
            if not content:
                continue
            if min(t_left, s_left) < MIN_ROOM:
                return pieces, False
            pair = tokenize_pair(content, self.teacher, self.student, (t_left, s_left), add_bos=False,
                                 add_eos=False)
            if pair.teacher_ids or pair.student_ids:
                pieces.append(Piece(pair.teacher_ids, pair.student_ids, True))
                t_left, s_left = t_left - len(pair.teacher_ids), s_left - len(pair.student_ids)
            if pair.num_bytes < len(content.encode("utf-8")):
                return pieces, False
        return pieces, True

    def next_window(self) -> Window:
        window: Window = []
        used_t = used_s = 0
        skipped = 0
        while True:
            room = (self.max_length - used_t, self.max_length - used_s)
            if min(room) < MIN_ROOM or (window and not self.pack):
                break
            if skipped > 10_000:
                raise TransplantError("no usable text in 10,000 tries: teacher and student tokenizations never "
                                      "share a byte boundary, or the documents are empty; check data.train")
            doc = self._current()
            if isinstance(doc, list):
                pieces, whole = self._chat_pieces(doc, room)
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
                    # The two tokenizations share no boundary here (e.g. different normalisation): skip a line.
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

# ----------------------------------------------------------------------------------------------------- batches
def _pad_id(vocab: Vocab) -> int:
    for role in ("pad", "eos"):
        if vocab.roles.get(role) is not None:
            return int(vocab.roles[role])
    return 0


def stitch(windows: list[Window], teacher: Vocab, student: Vocab) -> ChunkAlignment:
    """One `ChunkAlignment` for a batch of windows: aligned pieces go through a single `align_batch` call;
    their rows are laid end to end per window (markup pieces get chunk index -1)."""
    aligned = [p for w in windows for p in w if p.aligned]
    pieces_alignment = align_batch([p.teacher_ids for p in aligned], [p.student_ids for p in aligned],
                                   teacher, student) if aligned else None
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


class DistillLoader:
    """Micro-batches for one rank: global step s uses windows [s*G, (s+1)*G) of the packer's stream
    (G = micro_batch * grad_accum * world); micro-batch j of rank r takes the (j*world + r)-th slice of size
    micro_batch, so a run on N ranks sees exactly what one rank with N times the accumulation would.

    With `prefetch`, the next step's batches are built in a background thread while the current step computes
    (tokenizers and numpy release the GIL); `state_dict` always describes the batches already handed out.
    """

    def __init__(self, packer: Packer, *, micro_batch_size: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, prefetch: bool = False):
        self.packer, self.micro_batch_size, self.grad_accum = packer, micro_batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distill-data") if prefetch else None
        self._pending: Future | None = None
        self._consumed = dict(vars(packer.state))

    def _produce(self) -> tuple[list[ChunkAlignment], dict[str, int]]:
        size = self.micro_batch_size
        windows = [self.packer.next_window() for _ in range(size * self.grad_accum * self.world_size)]
        mine = []
        for j in range(self.grad_accum):
            start = (j * self.world_size + self.rank) * size
            mine.append(stitch(windows[start:start + size], self.packer.teacher, self.packer.student))
        return mine, dict(vars(self.packer.state))

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
