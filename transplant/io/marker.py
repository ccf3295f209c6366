"""The `tokentransplant.json` marker: what says a folder is an output of ours, and which files we wrote.

`--overwrite` may replace a folder only when it is an unchanged output of ours (`transplant.io.atomic`), so
the marker records every file with its size and modification time in nanoseconds. That is cheap for
multi-GB shards (no hashing) and a file rewritten or replaced in place (a model fine-tuned into the output
folder) changes it, so the user's own weights are never taken for ours.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

MARKER = "tokentransplant.json"  # visible on purpose: it says where the folder came from


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The parsed `tokentransplant.json` marker of `directory`, or None when absent or not ours."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not (
        isinstance(data, dict)
        and data.get("tool") == "tokentransplant"
        and isinstance(data.get("files"), list)
    ):
        return None
    return data


def files_below(directory: Path) -> list[str]:
    """Every file below `directory`, as relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir())


def _file_stat(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def changed_files(out: Path, recorded: Any) -> list[str]:
    """Files whose size or mtime differs from the marker's record (a model fine-tuned in place, a file
    replaced). Markers written before the record existed carry none and are checked by name only."""
    if not isinstance(recorded, dict):
        return []
    changed = []
    for name, stat in recorded.items():
        path = out / str(name)
        if path.is_file() and _file_stat(path) != stat:
            changed.append(str(name))
    return sorted(changed)


def write_marker(directory: Path, kind: str, info: dict[str, Any] | None = None) -> None:
    """Record that tokentransplant wrote `directory` and which files, so `--overwrite` may replace it."""
    from transplant.version import __version__

    files = [f for f in files_below(directory) if f != MARKER]
    marker = {
        "tool": "tokentransplant",
        "version": __version__,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(info or {}),
        "files": files,
        "stat": {f: _file_stat(Path(directory) / f) for f in files},
    }  # [size, mtime_ns], see changed_files
    (Path(directory) / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
