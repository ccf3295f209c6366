"""One way to write an output directory: build it beside the destination, then rename it into place.

Every writer (surgery, `extend`, distill exports, hypernetwork outputs) goes through `atomic_output`, so they
share one set of guarantees:

* Nothing half-written: the output is built in `.NAME.tmp-<host>-<pid>-<hex>` next to the destination (same
  filesystem, so the final rename is atomic) and removed on any error, including SIGTERM. A SIGKILLed run
  leaves its temp dir behind; the next run that writes into the same folder sweeps it, since the name says
  which process owned it and that process is gone.
* Overwrite only what we wrote: every output holds a `tokentransplant.json` marker listing its files with
  their size and modification time (nanoseconds; cheap for multi-GB shards, and any rewrite or replacement
  changes it). With `overwrite`, a directory is replaced only if it is empty or carries the marker, holds no
  other files and none of its files changed since; never the current directory, home, `/`, a parent of
  either, or an input (base, donor, a path given through `--set`) or a parent of one.
* Two runs racing for one name: the first rename wins and stays; the other run's rename fails, which is one
  line for it (`another run wrote OUT meanwhile`), and its temp dir is removed.
* Checked early: `check_output` finds an unwritable location, a name that may not be replaced or too little
  free space before any solving, so a long run never fails at its last step.
* Normal permissions: directories are made with mode 0o777 masked by the umask (mkdtemp's 0o700 made outputs
  private to their writer).

An output that is a single file (a GGUF export) goes through `atomic_file`: a temp file beside it, renamed
over it, with the same checks; an existing file is replaced only if the caller recognises it as one of ours.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transplant.errors import TransplantError, shorten
from transplant.io.marker import MARKER, changed_files, files_below, read_marker, write_marker

log = logging.getLogger(__name__)

__all__ = ["MARKER", "read_marker", "write_marker", "atomic_output", "atomic_file", "check_output",
           "check_file_output", "check_path_length", "existing_paths", "sweep_stale", "os_error_message",
           "Terminated"]

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+$")
# the final rename found the destination taken: another run finished first
_RACE = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)
# errno -> (what happened, what to do); all are the user's to fix, so they become one-line errors
_OS_ERRORS = {
    errno.ENOSPC: ("disk full", "free space or choose another --output"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another --output"),
    errno.EFBIG: ("file too large for the file-size limit (ulimit -f) or the filesystem",
                  "raise the limit (ulimit -f unlimited) or choose another --output"),
    errno.EACCES: ("permission denied", "choose another --output"),
    errno.EPERM: ("operation not permitted", "choose another --output"),
    errno.EROFS: ("read-only filesystem", "choose another --output"),
}


# ---------------------------------------------------------------- checks


def _is_within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def _forbidden_reason(out: Path, protected: Iterable[Path]) -> str | None:
    """Why `out` (resolved) may never be replaced, or None. Replacing a folder deletes everything below it."""
    if out == Path(out.anchor):
        return "is the filesystem root"
    for label, place in (("the current directory", Path.cwd()), ("your home directory", Path.home())):
        if _is_within(place.resolve(), out):
            return f"is {label}" if out == place.resolve() else f"contains {label}"
    for item in protected:
        item = Path(item).expanduser().resolve()
        if _is_within(item, out):
            return "is an input of this run" if out == item else f"contains an input of this run ({item})"
    return None


def _not_replaceable_reason(out: Path) -> str | None:
    """None when `out` is empty or a previous output of ours with nothing added or changed; else why not."""
    if out.is_symlink():
        return "is a symbolic link"
    if not out.is_dir():
        return "exists and is not a directory"
    if not any(out.iterdir()):
        return None
    marker = read_marker(out)
    if marker is None:
        return f"was not written by tokentransplant (no {MARKER} marker)"
    ours = {*marker["files"], MARKER}
    extra = [f for f in files_below(out) if f not in ours]
    if extra:
        return f"holds files tokentransplant did not write ({', '.join(extra[:3])})"
    changed = changed_files(out, marker.get("stat"))
    if changed:
        return f"holds files changed since tokentransplant wrote them ({', '.join(changed[:3])})"
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, out: Path) -> None:
    """Create and remove a directory where the temp output will go: the only test that ACLs, read-only mounts
    and root-squashed network filesystems all answer truthfully."""
    if not folder.is_dir():
        raise TransplantError(f"cannot create {out}: {folder} is a file, not a directory; choose another "
                              "--output")
    # named like a temp dir, so a kill here leaves nothing unswept
    probe = folder / _scratch_name(out, "tmp").name
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as exc:
        raise TransplantError(f"cannot write into {folder} ({exc.strerror or exc}); choose another "
                              "--output") from exc


def _check_destination_folder(out: Path, estimate_bytes: int) -> None:
    """What every output shares: its folder is writable, scratch of dead runs there is swept, and it has
    `estimate_bytes` free."""
    folder = _nearest_existing(out.parent)
    _probe_writable(folder, out)
    if folder == out.parent:
        sweep_stale(folder)
    free = shutil.disk_usage(folder).free
    if free < estimate_bytes:
        raise TransplantError(f"disk full: writing {out} needs about {estimate_bytes / 2**30:.2f} GiB but "
                              f"{folder} has {free / 2**30:.2f} GiB free; free space or choose another "
                              "--output")


def existing_paths(values: Iterable[Any]) -> list[Path]:
    """The values that name an existing file or folder (`--set hypernet=DIR`, `--set corpus=FILE`): inputs of
    the run, to be passed as `protected` so that no output replaces them."""
    found = []
    for value in values:
        if isinstance(value, (str, os.PathLike)) and 0 < len(os.fspath(value)) < 4096:
            try:
                if Path(value).expanduser().exists():
                    found.append(Path(value).expanduser())
            except (OSError, ValueError):  # a name too long or with a NUL byte is no path of an input
                continue
    return found


def check_path_length(out: Path) -> None:
    """Refuse a path the filesystem cannot hold before it is used (a 50 MB `-o` failed with a traceback after
    the models had loaded), naming it by its first characters only."""
    folder = _nearest_existing(Path(out.anchor or "/"))
    try:
        name_max, path_max = os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max((len(os.fsencode(part)) for part in out.parts), default=0)
    if longest > name_max or len(os.fsencode(str(out))) >= path_max:
        raise TransplantError(f"output path {shorten(out)} is too long ({len(str(out)):,} characters; a name "
                              f"may have {name_max} bytes, a path {path_max}); choose a shorter --output")


def check_output(path: str | os.PathLike, *, overwrite: bool, protected: Iterable[str | os.PathLike] = (),
                 estimate_bytes: int = 0) -> Path:
    """Fail now, with one line, if `path` could not be written at the end of the run; return it absolute.

    Call it before any solving: it checks that the name may be (re)placed (see the module docstring), that the
    nearest existing folder is writable and that it has `estimate_bytes` free. It also sweeps scratch dirs
    left by dead runs in the destination's folder. It writes nothing that stays.
    """
    out = Path(path).expanduser().absolute()
    check_path_length(out)
    if out.exists() or out.is_symlink():
        resolved = out.resolve()
        reason = _forbidden_reason(resolved, protected)
        if reason is not None:
            raise TransplantError(f"output {out} {reason}; tokentransplant never replaces it, choose a new "
                                  "--output")
        if not overwrite:
            raise TransplantError(f"output {out} already exists; pass --overwrite to replace it or choose "
                                  "another --output")
        reason = _not_replaceable_reason(out)
        if reason is not None:
            raise TransplantError(f"--overwrite refused: {out} {reason}; move its files away or choose "
                                  "another --output")
    _check_destination_folder(out, estimate_bytes)
    return out


# ---------------------------------------------------------------- scratch dirs


def _scratch_name(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove scratch dirs in `folder` whose writer (a process on this host) is gone; return what was removed.

    A `.NAME.old-*` is a previous output moved aside for a replacement that never landed: it goes back to NAME
    when NAME is missing, instead of being deleted.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _SCRATCH.match(entry.name)
        if not match or match["host"] != _HOST or _pid_alive(int(match["pid"])):
            continue
        if not entry.is_dir():  # a single-file output's temp file (`atomic_file`)
            if match["kind"] == "tmp" and entry.is_file() and not entry.is_symlink():
                entry.unlink()
                removed.append(entry)
                log.info("removed %s, left by a run that was killed", entry)
            continue
        final = entry.with_name(match["name"])
        if match["kind"] == "old" and not final.exists():
            entry.rename(final)
            log.warning("restored %s from an interrupted replacement", final)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.info("removed %s, left by a run that was killed", entry)
    return removed


def _make_scratch(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _scratch_name(out, "tmp")
        os.mkdir(tmp)  # 0o777 & ~umask, like any directory the user makes
    except OSError as exc:
        raise TransplantError(f"cannot write into {out.parent} ({exc.strerror or exc}); choose another "
                              "--output") from exc
    return tmp


def _raced(out: Path) -> TransplantError:
    return TransplantError(f"another run wrote {out} meanwhile; it was left as it is and this run's result "
                           "discarded; rerun with another --output")


def _move_into_place(tmp: Path, out: Path, existed: bool) -> None:
    """The final rename; `existed`: `out` was there at the last check (so `overwrite` replaces it). A run that
    wrote `out` after that check wins: its output stays, ours fails with one line (ENOTEMPTY/EEXIST; the
    caller removes our temp dir)."""
    try:
        if not existed:
            tmp.rename(out)  # never moves aside what another run put there meanwhile
            return
        old = _scratch_name(out, "old")
        out.rename(old)  # ENOENT: another run moved it away to replace it
    except OSError as exc:
        if exc.errno in (*_RACE, errno.ENOENT):
            raise _raced(out) from exc
        raise
    try:
        tmp.rename(out)
    except OSError as exc:
        if exc.errno not in _RACE:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)  # what we were replacing, the other run replaced first
        raise _raced(out) from exc
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived while an output was being written (a BaseException, so only cleanup code sees it)."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` in the main thread, so the temp dir is removed before the process
    ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _redeliver_sigterm() -> None:
    """After cleanup, let the original disposition act (default: the process dies by SIGTERM)."""
    signal.raise_signal(signal.SIGTERM)
    raise SystemExit(128 + signal.SIGTERM)


# ---------------------------------------------------------------- the helper


def os_error_message(exc: OSError, out: Path) -> TransplantError | None:
    """A one-line error for the OS errors a user can fix (disk full, EFBIG, permissions), else None."""
    known = _OS_ERRORS.get(exc.errno) if isinstance(exc, OSError) else None
    if known is None:
        return None
    what, fix = known
    return TransplantError(f"{what} while writing {out}; {fix}")


@contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False,
                  protected: Iterable[str | os.PathLike] = (), estimate_bytes: int = 0, kind: str = "model",
                  info: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield an empty temp dir beside `path`; when the block ends normally it becomes `path` (with a marker).

    On any error, SIGTERM included, the temp dir is removed and nothing at `path` changes. OS errors a user
    can fix (disk full, file-size limit, permissions) become one-line `TransplantError`s. `protected`,
    `overwrite` and `estimate_bytes` are checked as in `check_output`, again, right before writing starts.
    """
    protected = list(protected)
    out = check_output(path, overwrite=overwrite, protected=protected, estimate_bytes=estimate_bytes)
    tmp = _make_scratch(out)
    try:
        with _sigterm_raises():
            yield tmp
            write_marker(tmp, kind, info)
            existed = out.exists() or out.is_symlink()
            check_output(out, overwrite=overwrite, protected=protected)  # someone may have made it meanwhile
            _move_into_place(tmp, out, existed)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Terminated):
            _redeliver_sigterm()
        friendly = os_error_message(exc, out) if isinstance(exc, OSError) else None
        if friendly is not None:
            raise friendly from exc
        raise


# ---------------------------------------------------------------- single files


def check_file_output(path: str | os.PathLike, *, overwrite: bool,
                      protected: Iterable[str | os.PathLike] = (), estimate_bytes: int = 0,
                      is_ours: Callable[[Path], bool] = lambda _: False) -> Path:
    """`check_output` for an output that is one file (a GGUF): the same promises, with `is_ours(path)`
    deciding whether an existing file is an earlier output of ours that `overwrite` may replace. Refused too:
    a file inside an input (the model folder would then hold a file its marker does not list)."""
    out = Path(path).expanduser().absolute()
    check_path_length(out)
    for item in protected:
        item = Path(item).expanduser().resolve()
        if _is_within(out.resolve(), item):
            raise TransplantError(f"output {out} is inside an input of this run ({item}); choose a path "
                                  "outside it")
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink():
            raise TransplantError(f"output {out} is a directory; name a file, e.g. {out / 'model.gguf'}")
        if not overwrite:
            raise TransplantError(f"output {out} already exists; pass --overwrite to replace it or choose "
                                  "another --output")
        if out.is_symlink() or not is_ours(out):
            raise TransplantError(f"--overwrite refused: {out} was not written by tokentransplant; move it "
                                  "away or choose another --output")
    _check_destination_folder(out, estimate_bytes)
    return out


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = False,
                protected: Iterable[str | os.PathLike] = (), estimate_bytes: int = 0,
                is_ours: Callable[[Path], bool] = lambda _: False) -> Iterator[Path]:
    """Yield a temp file name beside `path`; when the block ends normally the file replaces `path` atomically.

    On any error, SIGTERM included, the temp file is removed and `path` is untouched; the checks of
    `check_file_output` run before and again right before the rename. Permissions are the umask's, as for
    any file the user makes."""
    protected = list(protected)
    out = check_file_output(path, overwrite=overwrite, protected=protected, estimate_bytes=estimate_bytes,
                            is_ours=is_ours)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch_name(out, "tmp")
    try:
        with _sigterm_raises():
            yield tmp
            if not tmp.is_file():
                raise RuntimeError(f"nothing was written to {tmp}")
            check_file_output(out, overwrite=overwrite, protected=protected, is_ours=is_ours)
            try:
                os.replace(tmp, out)
            except IsADirectoryError as exc:  # another run made a folder there meanwhile
                raise _raced(out) from exc
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Terminated):
            _redeliver_sigterm()
        friendly = os_error_message(exc, out) if isinstance(exc, OSError) else None
        if friendly is not None:
            raise friendly from exc
        raise
