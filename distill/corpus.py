"""Training corpora read lazily: folders of .txt / .jsonl / .jsonl.gz (and .txt.gz) files, `texts:NAME`
corpora.

A corpus of any size is read as a stream of documents (~4 KB each: texts are cut at blank lines; a jsonl line
is a `text`, cut the same way, or a `messages` conversation) and never held whole in RAM. One streaming scan
at start counts the documents of each file and records where every block of `block_docs` documents starts (a
byte offset, decompressed for .gz); afterwards a document is read by seeking to its block and reading that
block (kept in a small cache). Memory: a few integers per block plus the cached blocks.

Shuffling is two-level so that it needs no per-document table: each epoch permutes the blocks, then the
documents inside each block (both from (seed, epoch), so the order is a pure function of them and a resumed or
sharded run reads exactly what an uninterrupted one would). Blocks of one .gz file keep their file order
within an epoch (only their slots among the other blocks are shuffled), so a compressed file is only ever read
forwards. When a corpus holds at most `_CACHED_BLOCKS` x `block_docs` documents (e.g. the bundled `texts:NAME`
corpora, however many sources) the order is instead one permutation of all documents: with
two-level shuffling each small source is one block, and a short run read one source after the other (30
healing steps saw only German text while English, code and numbers waited their turn). Larger corpora mix at
block granularity. `stratify` (small corpora) spreads each source's documents evenly over the epoch instead,
so any stretch of steps reads every source in proportion: with one plain permutation a 120-step run read
none of the 19 number-table documents among 647 at one seed of three, and 2-3 at the others.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

DOC_BYTES = 4096  # long texts are split into ~4 KB documents at paragraph/line breaks (the unit of shuffling)
BLOCK_DOCS = 4096  # documents per block: the unit of seeking and of the first shuffle level
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".txt.gz")
_OPEN_FILES = 8  # file handles kept open (LRU)
_CACHED_BLOCKS = 4


def split_lines(lines: Iterable[str], doc_bytes: int = DOC_BYTES) -> Iterator[str]:
    """Documents of about `doc_bytes` from a stream of lines (keepends): a document ends after a blank line
    once it holds `doc_bytes`, or after any line once it holds twice that (texts without paragraphs)."""
    current: list[str] = []
    size = 0
    for line in lines:
        current.append(line)
        size += len(line.encode("utf-8"))
        if size >= doc_bytes and (not line.strip() or size >= 2 * doc_bytes):
            yield "".join(current)
            current, size = [], 0
    if current:
        yield "".join(current)


def split_text(text: str, doc_bytes: int = DOC_BYTES) -> list[str]:
    """Cut a text into documents (`split_lines` rules); the documents joined are the text."""
    return list(split_lines(text.splitlines(keepends=True), doc_bytes))


def _record_docs(record: Any, where: str, doc_bytes: int) -> list[Any]:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return [[{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]]
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return split_text(record["text"], doc_bytes)
    raise TransplantError(f"{where} has neither a `text` string nor a `messages` list; give each "
                          "line one of them")


def _parse_line(raw: bytes, where: str, doc_bytes: int) -> list[Any]:
    if not raw.strip():
        return []
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransplantError(f"{where} is not valid JSON ({err}); fix or remove the line") from err
    return _record_docs(record, where, doc_bytes)


@dataclass
class _Source:
    """One file (or in-memory text) of the corpus and where its blocks start."""

    name: str
    path: Path | None  # None: in-memory documents (`texts:NAME`, a list handed to the packer)
    docs: list[Any] | None  # in-memory documents
    count: int = 0
    # per block: (byte offset of its first line, docs to skip)
    block_offsets: tuple[tuple[int, int], ...] = ()

    @property
    def jsonl(self) -> bool:
        return self.path is not None and ".jsonl" in self.path.name

    @property
    def compressed(self) -> bool:
        return self.path is not None and self.path.suffix == ".gz"


class Corpus:
    """Documents from files, folders and `texts:NAME` corpora, in order, read block by block on demand."""

    def __init__(self, sources: list[_Source], *, doc_bytes: int = DOC_BYTES, block_docs: int = BLOCK_DOCS):
        self.sources, self.doc_bytes, self.block_docs = sources, doc_bytes, block_docs
        self._handles: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._blocks: OrderedDict[int, list[Any]] = OrderedDict()
        self._orders: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        for source in sources:
            if source.docs is None:
                self._scan(source)
            else:
                source.count = len(source.docs)
        counts = [-(-s.count // block_docs) for s in sources]
        self.block_source = np.repeat(np.arange(len(sources)), counts)  # block -> source
        self.block_index = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, np.int64)
        self.block_size = np.array([min(block_docs, sources[s].count - k * block_docs)
                                    for s, k in zip(self.block_source.tolist(), self.block_index.tolist())],
                                   dtype=np.int64)
        # a corpus no bigger than the block cache's worth of documents is shuffled as one permutation and kept
        # whole in the cache, however many sources (blocks) it has: six small sources are six blocks, and the
        # two-level order read them one after the other
        self.whole = len(self) <= _CACHED_BLOCKS * block_docs
        self._cache_blocks = max(_CACHED_BLOCKS, self.block_size.size) if self.whole else _CACHED_BLOCKS

    @classmethod
    def from_documents(cls, documents: list[Any], **kwargs: Any) -> Corpus:
        return cls([_Source("documents", None, list(documents))], **kwargs)

    def __len__(self) -> int:
        return int(self.block_size.sum())

    # ------------------------------------------------------------------------------------------------ reading
    def _open(self, index: int) -> IO[bytes]:
        handle = self._handles.pop(index, None)
        if handle is None:
            path = self.sources[index].path
            handle = (gzip.open(path, "rb") if self.sources[index].compressed
                      else open(path, "rb"))  # noqa: SIM115
            while len(self._handles) >= _OPEN_FILES:
                self._handles.popitem(last=False)[1].close()
        self._handles[index] = handle
        return handle

    def _lines(self, index: int, offset: int) -> Iterator[tuple[int, bytes]]:
        """(byte offset, raw line) from `offset` on."""
        handle = self._open(index)
        if handle.tell() != offset:
            handle.seek(offset)  # gzip: forwards decompresses on, backwards restarts (block order avoids it)
        position = offset
        for raw in iter(handle.readline, b""):
            yield position, raw
            position += len(raw)

    def _docs_from(self, index: int, offset: int) -> Iterator[tuple[int, int, Any]]:
        """(byte offset of the line it starts in, document number within that line, document) from
        `offset`."""
        source = self.sources[index]
        if source.jsonl:
            for position, raw in self._lines(index, offset):
                for k, doc in enumerate(_parse_line(raw, f"{source.name} (line at byte {position})",
                                                    self.doc_bytes)):
                    yield position, k, doc
            return
        lines = self._decoded(index, offset)
        first = next(lines, None)
        while first is not None:  # split_lines' rule, keeping each document's first line offset
            start, line = first
            current, size = [line], len(line.encode("utf-8"))
            first = None
            for position, line in lines:
                if size >= self.doc_bytes and (not current[-1].strip() or size >= 2 * self.doc_bytes):
                    first = (position, line)
                    break
                current.append(line)
                size += len(line.encode("utf-8"))
            yield start, 0, "".join(current)

    def _decoded(self, index: int, offset: int) -> Iterator[tuple[int, str]]:
        name = self.sources[index].name
        for position, raw in self._lines(index, offset):
            try:
                yield position, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TransplantError(f"{name} is not UTF-8 text (byte "
                                      f"{position + err.start}); convert it") from err

    def _scan(self, source: _Source) -> None:
        """One streaming pass: count documents and record where each block starts."""
        count, offsets = 0, []
        for position, k, _ in self._docs_from(self.sources.index(source), 0):
            if count % self.block_docs == 0:
                offsets.append((position, k))
            count += 1
        source.count, source.block_offsets = count, tuple(offsets)
        log.info("corpus: %s holds %d documents (%d blocks)", source.name, count, len(offsets))

    def _block(self, block: int) -> list[Any]:
        cached = self._blocks.pop(block, None)
        if cached is None:
            index, k = int(self.block_source[block]), int(self.block_index[block])
            source = self.sources[index]
            if source.docs is not None:
                cached = source.docs[k * self.block_docs:(k + 1) * self.block_docs]
            else:
                offset, skip = source.block_offsets[k]
                cached = []
                for _, _, doc in self._docs_from(index, offset):
                    if skip:
                        skip -= 1
                        continue
                    cached.append(doc)
                    if len(cached) == self.block_size[block]:
                        break
            while len(self._blocks) >= self._cache_blocks:
                self._blocks.popitem(last=False)
        self._blocks[block] = cached
        return cached

    # ------------------------------------------------------------------------------------------------ order
    def _order(self, seed: int, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        """(blocks in epoch order, cumulative document count at the end of each)."""
        key = (seed, epoch, shuffle)
        if key not in self._orders:
            blocks = np.arange(self.block_size.size)
            if shuffle:
                blocks = np.random.default_rng([seed, epoch]).permutation(blocks)
                for index, source in enumerate(self.sources):
                    if source.compressed:  # read forwards: its blocks keep file order in their shuffled slots
                        mine = self.block_source[blocks] == index
                        blocks[mine] = np.sort(blocks[mine])
            self._orders[key] = (blocks, np.cumsum(self.block_size[blocks]))
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[key]

    def _global_order(self, seed: int, epoch: int, stratify: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(a permutation of all documents as file-order indices, cumulative document count at the end of each
        block): the shuffle of a corpus whose blocks all fit in the cache, so random access never re-reads
        one."""
        key = ("global", seed, epoch, stratify)
        if key not in self._orders:
            ends = np.cumsum(self.block_size)
            if stratify:
                rng = np.random.default_rng([seed, epoch, 2])
                order = stratified_order([source.count for source in self.sources], rng)
            else:
                order = np.random.default_rng([seed, epoch, 1]).permutation(int(ends[-1]) if ends.size else 0)
            self._orders[key] = (order, ends)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[key]

    def document(self, seed: int, epoch: int, position: int, shuffle: bool = True,
                 stratify: bool = False) -> Any:
        """The document at `position` of epoch `epoch`'s order (`stratify`: small corpora only, see the module
        docstring; a corpus that is not held whole keeps its block shuffle)."""
        if shuffle and self.whole:
            order, ends = self._global_order(seed, epoch, stratify)
            flat = int(order[position])
            block = int(np.searchsorted(ends, flat, side="right"))
            return self._block(block)[flat - (int(ends[block - 1]) if block else 0)]
        blocks, ends = self._order(seed, epoch, shuffle)
        slot = int(np.searchsorted(ends, position, side="right"))
        block = int(blocks[slot])
        inside = position - (int(ends[slot - 1]) if slot else 0)
        if shuffle:
            inside = int(np.random.default_rng([seed, epoch,
                                                block]).permutation(int(self.block_size[block]))[inside])
        return self._block(block)[inside]

    def __iter__(self) -> Iterator[Any]:
        """Every document in file order (no shuffle)."""
        for block in range(self.block_size.size):
            yield from self._block(block)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def stratified_order(counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """A permutation of `sum(counts)` file-order indices (sources concatenated) in which each source's
    documents, in random order, sit at evenly spaced random positions: document i of a source of c gets
    the key (i + u) / c, u ~ U(0, 1), and the epoch reads keys in increasing order. The first n documents
    then hold n·c/total of a small source within a document or two (a dominant source absorbs the others'
    rounding: within the number of sources), where a plain permutation gives a hypergeometric count (0 of 19
    in the first 150 of 647, at one seed of three)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    flats = [start + rng.permutation(count) for start, count in zip(starts.tolist(), counts)]
    keys = [(np.arange(count) + rng.random(count)) / max(count, 1) for count in counts]
    if not flats:
        return np.zeros(0, np.int64)
    return np.concatenate(flats)[np.argsort(np.concatenate(keys), kind="stable")]


def open_corpus(sources: list[str], *, corpus_bytes: int = 2_000_000, doc_bytes: int = DOC_BYTES,
                block_docs: int = BLOCK_DOCS) -> Corpus:
    """A lazy corpus over files, folders (their .txt/.jsonl/.jsonl.gz/.txt.gz files, sorted) and `texts:NAME`
    corpora (the first `corpus_bytes` of their training region, held in memory: they are small)."""
    found: list[_Source] = []
    for spec in map(str, sources):
        if spec.startswith("texts:"):
            from transplant.assets import texts

            name = spec[len("texts:"):]
            found.append(_Source(spec, None, split_text(texts.train_text(name, corpus_bytes), doc_bytes)))
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        elif path.is_file():
            files = [path]
        else:
            raise TransplantError(f"training data {spec} does not exist; give .txt/.jsonl(.gz) "
                                  "files, a folder of them, or texts:NAME")
        found.extend(_Source(str(f), f, None) for f in files)
    corpus = Corpus(found, doc_bytes=doc_bytes, block_docs=block_docs)
    if not len(corpus):
        raise TransplantError(f"no training text found in {sources}; check data.train")
    return corpus


def source_names(specs: Iterable[str]) -> list[str]:
    """The name each `data.train` / `eval.texts` entry goes by (slices, healing groups): NAME for
    `texts:NAME`, the file stem for a path."""
    return [spec[6:] if spec.startswith("texts:") else Path(spec).stem for spec in map(str, specs)]


def heldout_texts(specs: list[str], n_bytes: int) -> dict[str, str]:
    """{name: text} for the recipe's `eval.texts`: `texts:NAME` takes the first `n_bytes` of that corpus's
    held-out region (never trained on); a path is read whole (the user chose its size)."""
    from transplant.assets import texts as corpora

    held: dict[str, str] = {}
    for spec in map(str, specs):
        name = source_names([spec])[0]
        if spec.startswith("texts:"):
            held[name] = corpora.heldout(name, n_bytes)
            continue
        path = Path(spec)
        if not path.is_file():
            raise TransplantError(f"eval text {spec} does not exist; give a file or texts:NAME")
        held[name] = path.read_text(encoding="utf-8")
    return held
