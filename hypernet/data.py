"""Training text for the hypernetwork, streamed: memory does not grow with the corpus.

`corpus` is `{name: bytes}` of built-in text (transplant.assets.texts), or a path: one file or a folder of
.txt / .jsonl files, each optionally gzipped (.txt.gz, .jsonl.gz); a .jsonl line holds `{"text": ...}` or a
chat `{"messages": [{"content": ...}, ...]}` (contents joined).

Why it is shaped this way:
- Nothing reads a file whole. Training asks for a *block* of `block_bytes` at a time (the text one sampled
  tokenizer is drawn from and trained on, ZeTT-style); a block is `CHUNK_BYTES` pieces, each piece the next
  lines of one file, the file drawn with probability proportional to its text size, so a folder of sources
  mixes from the first step instead of being read file after file. A file that ends starts over.
- The stream's position is a few integers per file (`state_dict`): a checkpoint stores the position at the
  start of the current block and resume re-reads the same block, so a resumed run sees exactly the text the
  uninterrupted one would have. Which file each piece comes from is a pure function of (seed, block index).
- At most `MAX_OPEN` files are open at once (least recently used closed); a gzip file reopened later seeks by
  decompressing up to its position, once.
- Text lines are read with a length limit (a 1 GB one-line file is read in pieces); jsonl records are read
  whole (a record is the unit the user gave).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from transplant.errors import TransplantError

CHUNK_BYTES = 16384  # bytes of one file read in a row (the unit of mixing between files)
MAX_OPEN = 16
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


@dataclass
class Source:
    """One stream of text: a file, or a built-in text held in memory."""

    name: str
    weight: int  # bytes of text (uncompressed): how often it is drawn
    opener: Callable[[], IO[bytes]]
    jsonl: bool


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _text_size(path: Path, gz: bool) -> int:
    """Bytes of text in the file: for gzip the trailer's ISIZE (uncompressed size mod 2**32), read in O(1), so
    a compressed source is drawn as often as its text warrants."""
    size = path.stat().st_size
    if not gz or size < 18:
        return max(1, size)
    with path.open("rb") as handle:
        handle.seek(-4, 2)
        isize = int.from_bytes(handle.read(4), "little")
    return max(1, size, isize)


def _file_source(path: Path) -> Source:
    suffix = _suffix(path)
    gz = suffix is not None and suffix.endswith(".gz")
    opener = (lambda: gzip.open(path, "rb")) if gz else (lambda: path.open("rb"))
    return Source(str(path), _text_size(path, gz), opener, jsonl=".jsonl" in (suffix or ""))


def corpus_sources(spec: dict[str, int] | str) -> list[Source]:
    """The sources a recipe's `corpus` names, or a one-line error saying what to give instead."""
    if isinstance(spec, dict):
        from transplant.assets.texts import train_text

        sources = []
        for name, n_bytes in spec.items():
            data = train_text(name, int(n_bytes)).encode("utf-8")
            sources.append(Source(f"texts:{name}", max(1, len(data)),
                                  lambda data=data: io.BytesIO(data), False))
        if not sources:
            raise TransplantError("recipe key corpus is empty; give {name: bytes} of built-in text or a path")
        return sources
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
        if not files:
            raise TransplantError(f"corpus folder {path} holds no {', '.join(SUFFIXES)} files; add "
                                  "some or pass a file")
    elif path.is_file():
        files = [path]
    else:
        raise TransplantError(f"corpus {spec} does not exist; give a .txt/.jsonl(.gz) file, a "
                              "folder of them, or {name: bytes} of built-in text")
    return [_file_source(p) for p in files]


def _record_text(line: bytes, where: str) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransplantError(f"{where} is not a valid JSON line ({err}); fix or remove it") from None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    raise TransplantError(f"{where} has neither a `text` string nor a `messages` list; give each "
                          "line one of them")


def _missing_utf8(data: bytes) -> int:
    """How many continuation bytes the last character of `data` still needs (0 when it is complete)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return max(0, need - back)
    return 0


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TransplantError(f"{where} is not UTF-8 text (byte {data[err.start]:#04x} near there); "
                              "pass UTF-8 text files") from None


def mix_seed(*parts: int) -> int:
    """A 62-bit seed from integers: RNG streams keyed by (seed, step, micro-batch, ...) that do not depend on
    how many processes share the work or where a run was resumed."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class CorpusStream:
    """Blocks of text drawn from the sources; its position is `state_dict()`, a few integers per source."""

    def __init__(self, sources: list[Source], seed: int = 0, chunk_bytes: int = CHUNK_BYTES):
        self.sources, self.seed, self.chunk_bytes = sources, seed, chunk_bytes
        self.offsets = [0] * len(sources)  # decompressed byte position of the next line
        self.passes = [0] * len(sources)  # times each source was read to its end
        self._open: OrderedDict[int, IO[bytes]] = OrderedDict()

    def state_dict(self) -> dict[str, Any]:
        return {"offsets": list(self.offsets), "passes": list(self.passes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["offsets"]) != len(self.sources):
            raise TransplantError("the checkpoint was written for a corpus of "
                                  f"{len(state['offsets'])} files, this "
                                  f"one has {len(self.sources)}; resume with the same corpus or "
                                  "start a new run")
        self.close()
        self.offsets, self.passes = list(state["offsets"]), list(state["passes"])

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def _handle(self, index: int) -> IO[bytes]:
        handle = self._open.get(index)
        if handle is None:
            handle = self.sources[index].opener()
            if self.offsets[index]:
                handle.seek(self.offsets[index])
            self._open[index] = handle
            while len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(index)
        return handle

    def _read_piece(self, index: int) -> str:
        """The next ~chunk_bytes of source `index` (whole lines; a text line longer than that is cut)."""
        source = self.sources[index]
        parts: list[str] = []
        size, wrapped = 0, False
        while size < self.chunk_bytes:
            handle = self._handle(index)
            where = f"{source.name} (offset {self.offsets[index]})"
            line = handle.readline() if source.jsonl else handle.readline(self.chunk_bytes - size)
            # cut inside a long line: end on a character
            if line and not line.endswith(b"\n") and not source.jsonl:
                line += handle.read(_missing_utf8(line))
            if not line:
                if wrapped:  # a whole pass gave nothing: an empty file
                    break
                self._open.pop(index).close()
                self.offsets[index], wrapped = 0, True
                self.passes[index] += 1
                continue
            self.offsets[index] += len(line)
            size += len(line)
            if source.jsonl:
                if line.strip():
                    parts.append(_record_text(line, where) + "\n\n")
            else:
                parts.append(_decode(line, where))
        return "".join(parts)

    def read_block(self, block: int, n_bytes: int) -> list[str]:
        """About `n_bytes` of text as pieces (each from one source); the sources drawn depend only on
        (seed, block)."""
        rng = random.Random(mix_seed(self.seed, block))
        weights = [s.weight for s in self.sources]
        pieces: list[str] = []
        size, empty = 0, 0
        while size < n_bytes:
            index = rng.choices(range(len(self.sources)), weights)[0]
            piece = self._read_piece(index)
            if not piece:
                empty += 1
                if empty > 8 * len(self.sources):
                    raise TransplantError(f"corpus {', '.join(s.name for s in self.sources[:3])} has no "
                                          "text; give non-empty .txt/.jsonl files")
                continue
            pieces.append(piece)
            size += len(piece)
        return pieces


def cut_windows(pieces: list[str], count: int, chars: int, rng: random.Random) -> list[str]:
    """`count` random windows of `chars` characters, each inside one piece (pieces drawn by length)."""
    lengths = [len(p) for p in pieces]
    out = []
    for _ in range(count):
        piece = pieces[rng.choices(range(len(pieces)), lengths)[0]]
        start = rng.randrange(0, max(1, len(piece) - chars))
        out.append(piece[start : start + chars])
    return out
