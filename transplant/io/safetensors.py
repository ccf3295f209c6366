"""Streaming safetensors: read headers, copy tensors byte-for-byte, write shards one tensor at a time.

The format is 8 bytes (little-endian u64 header length) + a JSON header naming each tensor's dtype, shape and
[begin, end) byte range in the data section + the raw little-endian data. Because sizes are known before any
data is written, a shard's header can be written first and its tensors streamed after it, so a model of any
size is rewritten with memory for one tensor at most; a tensor that is copied unchanged never even becomes a
torch tensor (its bytes go through a fixed buffer), which keeps it bit-identical and out of the process RSS.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

from transplant.errors import TransplantError

# safetensors dtype code -> torch dtype (codes torch lacks are still copied through as raw bytes)
CODE_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        CODE_TO_DTYPE[_code] = getattr(torch, _attr)
DTYPE_TO_CODE: dict[torch.dtype, str] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}
CODE_ITEMSIZE: dict[str, int] = {code: torch.empty(0, dtype=dt).element_size()
                                 for code, dt in CODE_TO_DTYPE.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
COPY_BUFFER_BYTES = 16 * 1024 * 1024
PROGRESS_MIN_BYTES = 256 * 1024 * 1024  # below this, writing takes seconds: no progress bar


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives on disk: absolute byte range inside `file`."""

    name: str
    code: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype | None:
        return CODE_TO_DTYPE.get(self.code)


def _corrupt(path: Path, reason: str) -> TransplantError:
    return TransplantError(
        f"{path} is not a valid safetensors file ({reason}); re-download the base model or re-save it "
        "with save_pretrained"
    )


# Bits per element of every dtype in the format's spec (torch lacks some; they are copied through as raw
# bytes).
CODE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _parse_header_json(path: Path, raw: bytes) -> dict:
    """JSON with the failure modes of a hostile header turned into one-line errors (deep nesting included)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except RecursionError as exc:
        raise _corrupt(path, "header JSON is nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"header is not valid JSON: {str(exc).splitlines()[0][:120]}") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_fields(path: Path, name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, begin, end) of one header entry, every field type- and size-checked."""
    if not isinstance(info, dict) or set(info) != ENTRY_KEYS:
        raise _corrupt(path, f"entry {name!r} must have exactly dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in CODE_BITS:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {str(code)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has a bad shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise _corrupt(path, f"tensor {name!r} has bad data_offsets")
    begin, end = offsets
    bits = math.prod(shape) * CODE_BITS[code]
    if begin > end or bits % 8 or bits // 8 != end - begin:
        raise _corrupt(path, f"tensor {name!r} has {end - begin} bytes for shape {shape} {code}")
    return code, tuple(shape), begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap (two tensors sharing bytes), no gap, no tail."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise _corrupt(path, f"tensor {name!r} overlaps the bytes of another tensor")
        if begin > position:
            raise _corrupt(path, f"bytes {position}..{begin} of the data belong to no tensor")
        position = end
    if position != data_size:
        reason = "truncated?" if position > data_size else "trailing bytes belong to no tensor"
        raise _corrupt(path, f"tensors cover {position} of {data_size} data bytes ({reason})")


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one file's header before a byte of it is used.

    Checked, as the reference implementation does, plus what a hand-made file can get wrong: the header fits
    the file, is JSON without duplicate keys or runaway nesting, every entry has a known dtype, a shape of
    counts and offsets whose size equals dtype x shape, and the tensors tile the data section exactly (an
    overlap would silently give two weights the same bytes; a gap or tail means a damaged or hand-edited
    file).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise _corrupt(path, f"header length {header_len} does not fit the {size}-byte file")
            raw = fh.read(header_len)
    except OSError as exc:
        raise TransplantError(f"cannot read {path} ({exc.strerror or exc}); check the path and "
                              "permissions") from exc
    header = _parse_header_json(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        code, shape, begin, end = _entry_fields(path, name, info)
        entries[name] = TensorEntry(name, code, shape, path, data_start + begin, data_start + end)
    _check_layout(path, [(e.start - data_start, e.end - data_start, n) for n, e in entries.items()],
                  size - data_start)
    return entries, metadata


WEIGHT_INDEX = "model.safetensors.index.json"


def model_weight_files(model_dir: Path) -> list[Path]:
    index_path = model_dir / WEIGHT_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TransplantError(f"{index_path} is unreadable ({exc}); re-download the base model") from exc
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise TransplantError(f"{index_path} names missing shard {missing[0]}; re-download the base "
                                  "model")
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    found = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if found:
        return found
    others = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf")
                    for p in model_dir.glob(pattern))
    if others:
        raise TransplantError(
            f"{model_dir} has weights only as {', '.join(others[:3])}; only safetensors are read (pickle "
            "files can run code). Convert once with: python -c \"from transformers import "
            "AutoModelForCausalLM as M; "
            f"M.from_pretrained('{model_dir}').save_pretrained('{model_dir}-safetensors')\""
        )
    raise TransplantError(f"{model_dir} has no *.safetensors weights; pass a Hugging Face model folder")


def weight_entries(model_dir: Path) -> tuple[dict[str, TensorEntry], list[int]]:
    """All tensors of the base in storage order (file, then offset), and the byte size of each base shard."""
    entries: dict[str, TensorEntry] = {}
    shard_sizes = []
    for path in model_weight_files(Path(model_dir)):
        header, _ = read_header(path)
        for entry in sorted(header.values(), key=lambda e: e.start):
            if entry.name in entries:
                raise TransplantError(f"tensor {entry.name!r} is stored twice "
                                      f"({entries[entry.name].file.name} and "
                                      f"{path.name}); re-download the model")
            entries[entry.name] = entry
        shard_sizes.append(sum(e.nbytes for e in header.values()))
    return entries, shard_sizes



# ---------------------------------------------------------------- writing


@dataclass
class PlannedTensor:
    """One tensor of an output shard: its header fields and how to produce its bytes."""

    name: str
    code: str
    shape: tuple[int, ...]
    nbytes: int
    source: TensorEntry | None = None  # copy these bytes unchanged ...
    produce: Callable[[], torch.Tensor] | None = None  # ... or write this tensor (called once, when written)


def plan_copy(entry: TensorEntry, cast_to: torch.dtype | None = None) -> PlannedTensor:
    """Copy a tensor through; floating tensors are cast when `cast_to` differs from their dtype."""
    dtype = entry.dtype
    if cast_to is None or dtype is None or not dtype.is_floating_point or dtype == cast_to:
        return PlannedTensor(entry.name, entry.code, entry.shape, entry.nbytes, source=entry)
    code = DTYPE_TO_CODE[cast_to]

    def produce() -> torch.Tensor:
        return load_tensor(entry).to(cast_to)

    return PlannedTensor(entry.name, code, entry.shape, math.prod(entry.shape) * CODE_ITEMSIZE[code],
                         produce=produce)


def plan_tensor(name: str, make: Callable[[], torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]):
    code = DTYPE_TO_CODE[dtype]
    return PlannedTensor(name, code, shape, math.prod(shape) * CODE_ITEMSIZE[code], produce=make)


def load_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor through safetensors' memory map (only its own pages are touched)."""
    from safetensors import safe_open

    with safe_open(str(entry.file), framework="pt") as handle:
        return handle.get_tensor(entry.name)


def split_into_shards(tensors: Iterable[PlannedTensor],
                      max_shard_bytes: int | None) -> list[list[PlannedTensor]]:
    """Fill shards in order up to the cap; a tensor larger than the cap gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if max_shard_bytes is not None and shards[-1] and used + tensor.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.code, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _write_all(dst: BinaryIO, data: memoryview) -> None:
    """Unbuffered writes may be partial; a large tensor goes out in one call per ~2 GB otherwise."""
    while len(data):
        written = dst.write(data)
        data = data[written:]


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, nbytes: int, buffer: bytearray) -> None:
    """Copy bytes file to file in the kernel (copy_file_range: no user-space copy, a reflink on XFS/btrfs);
    fall back to a bounded buffer where the filesystem or platform refuses."""
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while copied < nbytes:
                got = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - copied, start + copied)
                if not got:
                    raise TransplantError(f"{src.name} ended early while copying (truncated?); re-download "
                                          "the base model")
                copied += got
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
    src.seek(start + copied)
    view = memoryview(buffer)
    remaining = nbytes - copied
    while remaining:
        got = src.readinto(view[: min(len(buffer), remaining)])
        if not got:
            raise TransplantError(f"{src.name} ended early while copying (truncated?); re-download the base "
                                  "model")
        _write_all(dst, view[:got])
        remaining -= got


def _write_tensor(dst: BinaryIO, tensor: torch.Tensor, expected: PlannedTensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if tuple(tensor.shape) != tuple(expected.shape) or DTYPE_TO_CODE.get(flat.dtype) != expected.code:
        raise ValueError(f"{expected.name}: produced {tuple(tensor.shape)} {flat.dtype}, planned "
                         f"{expected.shape} {expected.code}")
    _write_all(dst, memoryview(flat.view(torch.uint8).numpy()))


def write_shard(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str], progress=None) -> None:
    """Write one safetensors file: header first, then each tensor's bytes, one tensor in memory at a time.

    The file is unbuffered on purpose: every write is large (a header or a whole tensor), and the kernel-side
    copies of unchanged tensors write at the file offset, which a user-space buffer would get out of order.
    `progress` (a tqdm bar) is advanced by each tensor's bytes."""
    buffer = bytearray(COPY_BUFFER_BYTES)
    sources: dict[Path, BinaryIO] = {}
    try:
        with open(path, "wb", buffering=0) as dst:
            _write_all(dst, memoryview(_header_bytes(tensors, metadata)))
            for tensor in tensors:
                if tensor.source is not None:
                    src = sources.get(tensor.source.file)
                    if src is None:
                        src = sources[tensor.source.file] = open(tensor.source.file, "rb", buffering=0)
                    _copy_range(src, dst, tensor.source.start, tensor.nbytes, buffer)
                else:
                    assert tensor.produce is not None
                    _write_tensor(dst, tensor.produce(), tensor)
                if progress is not None:
                    progress.update(tensor.nbytes)
    finally:
        for src in sources.values():
            src.close()


def write_shards(directory: Path, shards: list[list[PlannedTensor]], metadata: dict[str, str]) -> list[str]:
    """Write all shards (plus model.safetensors.index.json when there are several); return the file names.

    A progress bar (bytes, on a terminal) accompanies outputs above PROGRESS_MIN_BYTES."""
    names = shard_file_names(len(shards))
    total = sum(t.nbytes for shard in shards for t in shard)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", leave=False,
              disable=True if total < PROGRESS_MIN_BYTES else None) as bar:
        for name, tensors in zip(names, shards):
            bar.set_postfix_str(name, refresh=False)
            write_shard(directory / name, tensors, metadata, progress=bar)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)},
            "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
        }
        (directory / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names

