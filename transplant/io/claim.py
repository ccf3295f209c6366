"""Claiming a training folder: the one ownership rule for `distill` and `hypernet train`.

Training writes into its `output_dir` as it goes (checkpoints to resume from, metrics, a data index), so
unlike a transplant its output cannot be built aside and renamed into place (`transplant.io.atomic`). It
claims the folder instead, and may claim only:

* a new or empty folder (it then gets our `tokentransplant.json` marker, naming the command that owns it), or
* a folder of ours: its marker names the same command and it holds nothing beside what that command writes
  (`layout`: metrics, checkpoints, exports) and the files its marker lists. The trainer's own files change
  while it runs and a killed run leaves newer checkpoints than the marker records, so sizes are not
  compared here; a file the user added is.

Never the current directory, home, `/` or a folder containing them; never an input (base, teacher, student,
corpus or data files), a folder containing one, or a folder inside one (a metrics.jsonl inside a corpus
folder would be read as training text next time). `check_claim` only looks and runs before any model loads;
`claim_output_dir` repeats the checks and creates the folder once the inputs have been read and validated, so
a run refused for a bad input leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transplant.errors import TransplantError
from transplant.io.atomic import (
    _SCRATCH,
    _check_destination_folder,
    _forbidden_reason,
    _is_within,
    _probe_writable,
    check_path_length,
)
from transplant.io.marker import MARKER, read_marker, write_marker

__all__ = ["check_claim", "claim_output_dir"]

FIX = "choose another output_dir (--set output_dir=DIR)"


def _not_ours_reason(out: Path, kind: str, layout: Iterable[str], adopt: bool) -> str | None:
    """None when `out` is empty or a `kind` folder of ours holding nothing else; else why not."""
    if not out.is_dir():
        return "exists and is not a directory"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    marker = read_marker(out)
    if marker is None and not adopt:
        return f"holds files tokentransplant did not write (no {MARKER} marker)"
    if marker is not None and marker.get("kind") != kind:
        return f"holds a tokentransplant {marker.get('kind')} output, not a {kind} run"
    ours = {*layout, MARKER, *(str(f).split("/")[0] for f in (marker or {}).get("files", []))}
    extra = [e for e in entries if e not in ours and not _SCRATCH.match(e)]
    if extra:
        return f"holds files tokentransplant did not write ({', '.join(extra[:3])})"
    return None


def check_claim(path: str | os.PathLike, *, kind: str, layout: Iterable[str],
                protected: Iterable[str | os.PathLike] = (), adopt: bool = False) -> Path:
    """Fail now, with one line, if `path` may not be claimed by a `kind` run; return it absolute. Writes
    nothing that stays. `adopt` accepts an unmarked folder holding only `layout` (a run from before markers,
    recognised by the caller from its checkpoints)."""
    out = Path(path).expanduser().absolute()
    check_path_length(out)
    resolved = out.resolve()
    for item in protected:
        item = Path(item).expanduser().resolve()
        if item != resolved and _is_within(resolved, item):
            raise TransplantError(f"output_dir {out} is inside an input of this run ({item}); {FIX}")
    if out.exists() or out.is_symlink():
        reason = (_forbidden_reason(resolved, protected)
                  or _not_ours_reason(out, kind, layout, adopt))
        if reason is not None:
            raise TransplantError(f"output_dir {out} {reason}; {FIX}")
        _probe_writable(out, out)
    else:
        _check_destination_folder(out, 0)
    return out


def claim_output_dir(path: str | os.PathLike, *, kind: str, layout: Iterable[str],
                     protected: Iterable[str | os.PathLike] = (), adopt: bool = False) -> Path:
    """`check_claim`, then create the folder and mark it as a `kind` run's (a folder of ours keeps its
    marker); return it absolute. Call it once the inputs are validated: nothing is written before."""
    layout, protected = list(layout), list(protected)
    out = check_claim(path, kind=kind, layout=layout, protected=protected, adopt=adopt)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if read_marker(out) is None:
            write_marker(out, kind)
    except OSError as exc:
        raise TransplantError(f"cannot write into {out} ({exc.strerror or exc}); {FIX}") from exc
    return out
