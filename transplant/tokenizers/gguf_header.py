"""Bounds-check a GGUF file's header before any reader trusts it.

`gguf.GGUFReader` takes every length and count in the file at its word: an array whose count lies makes it
loop past the end of the file for ever (each element it reads there is empty, so its offset stops moving),
and transformers' GGUF loader uses the same reader. Here the header is walked once over a read-only memory
map, and every string length, array count and tensor dimension count is checked against the bytes that are
left, so a damaged or hostile file is a one-line error within milliseconds, whatever its claimed sizes (and a
12 GB GGUF is never read into memory).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from transplant.errors import TransplantError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# GGUF value type -> bytes
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 8  # ggml uses 4
MAX_ARRAY_NESTING = 4


class _Cursor:
    """Reads little- or big-endian integers at a position, refusing to run past the end of the file."""

    def __init__(self, data: mmap.mmap | bytes, path: Path):
        self.data, self.path, self.pos, self.order = data, path, 0, "<"

    def error(self, reason: str) -> TransplantError:
        return TransplantError(f"{self.path} is not a valid GGUF file ({reason}); pass an intact .gguf file")

    def skip(self, count: int, what: str) -> None:
        if count < 0 or count > len(self.data) - self.pos:
            raise self.error(f"{what} claims {count} bytes at offset {self.pos} but only "
                             f"{len(self.data) - self.pos} are left")
        self.pos += count

    def read(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        start = self.pos
        self.skip(size, what)
        return struct.unpack_from(self.order + fmt, self.data, start)[0]

    def string(self, what: str) -> None:
        self.skip(self.read("Q", f"{what} length"), what)


def _value(cur: _Cursor, kind: int, what: str, depth: int = 0) -> None:
    if kind in SCALAR_SIZES:
        cur.skip(SCALAR_SIZES[kind], what)
    elif kind == STRING:
        cur.string(what)
    elif kind == ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise cur.error(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        item, count = cur.read("I", f"{what} item type"), cur.read("Q", f"{what} count")
        if item in SCALAR_SIZES:  # fixed size: one bounds check for the whole array
            cur.skip(count * SCALAR_SIZES[item], f"{what} ({count} items)")
            return
        if count * 8 > len(cur.data) - cur.pos:  # every string or array item takes at least 8 bytes
            raise cur.error(f"{what} claims {count} items, more than the file can hold")
        for index in range(count):
            _value(cur, item, f"{what}[{index}]", depth + 1)
    else:
        raise cur.error(f"{what} has unknown value type {kind}")


def _walk(cur: _Cursor) -> None:
    if bytes(cur.data[:4]) != MAGIC:
        raise cur.error("no GGUF magic")
    cur.skip(4, "magic")
    version = cur.read("I", "version")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        cur.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in VERSIONS:
        raise cur.error(f"version {version}, this reader knows {', '.join(map(str, VERSIONS))}")
    n_tensors, n_kv = cur.read("Q", "tensor count"), cur.read("Q", "metadata count")
    if (n_tensors + n_kv) * 12 > len(cur.data) - cur.pos:
        raise cur.error(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit the file")
    for index in range(n_kv):
        key_start = cur.pos + 8
        cur.string(f"key of metadata entry {index}")
        key = bytes(cur.data[key_start : cur.pos]).decode("utf-8", "replace")[:80]
        _value(cur, cur.read("I", f"type of {key}"), key)
    for index in range(n_tensors):
        cur.string(f"name of tensor {index}")
        dims = cur.read("I", f"dimension count of tensor {index}")
        if dims > MAX_DIMS:
            raise cur.error(f"tensor {index} claims {dims} dimensions")
        cur.skip(8 * dims + 4 + 8, f"shape, type and offset of tensor {index}")


def check_gguf(path: Path) -> None:
    """Raise a one-line `TransplantError` unless every length in `path`'s header fits inside the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if path.stat().st_size < 24:
                raise _Cursor(b"", path).error(f"only {path.stat().st_size} bytes")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk(_Cursor(data, path))
    except OSError as exc:
        raise TransplantError(f"cannot read {path} ({exc.strerror or exc}); check the path "
                              "and permissions") from exc
