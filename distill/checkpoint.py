"""Checkpoints that resume exactly, for both trainers (distillation and hypernetwork): DeepSpeed's model,
optimizer and scheduler state, the trainer's own state (step, data position, ...) and, per rank, the RNG
states.

One format. `<dir>/step_NNNNNNNN/` holds DeepSpeed's files, `trainer.json` (rank 0: the step and the trainer's
state, also stored as DeepSpeed client state) and `trainer_rank<R>.pt` (that rank's torch/python/CUDA RNG).
DeepSpeed writes `<dir>/latest` only after every shard of a checkpoint is on disk, so a run killed while
saving resumes from the previous complete one; the trainer files are written into the tag folder before
DeepSpeed saves, for the same reason. `prune` deletes older checkpoints only once `latest` names the one just
saved, and never one newer than it.

Resume is checked before anything loads (`check_resume`): a `latest` naming a missing or incomplete tag, a
corrupt `trainer.json` or (while loading) a truncated DeepSpeed file is a one-line error that names the valid
checkpoints; nothing silently starts from step 0 and nothing is pruned.

Checkpoints are code-free: DeepSpeed itself loads its files with `torch.load(weights_only=False)`, i.e. full
pickle, so a tampered `*_model_states.pt` would run whatever it names on `--resume`. `load` therefore holds
every `torch.load` to weights-only unpickling for the duration (tensors, containers, numbers, strings and the
few plain-data DeepSpeed classes in `SAFE_DEEPSPEED_GLOBALS`); anything else is refused with one line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

# Plain-data classes DeepSpeed pickles into its optimizer states (loss scalers, the ZeRO stage enum, slice
# addresses): constructing them runs no code of the file's choosing.
SAFE_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

TAG_PREFIX = "step_"
TAG_PATTERN = re.compile(rf"^{TAG_PREFIX}\d+$")
STATE_FILE = "trainer.json"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tags(directory: Path) -> list[str]:
    """The checkpoint folders present, oldest first (complete or not)."""
    folder = Path(directory)
    return sorted(p.name for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir()) if folder.is_dir() else []


def latest_tag(directory: Path) -> str | None:
    latest = Path(directory) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text(errors="replace").strip()
    return tag if TAG_PATTERN.match(tag) and (Path(directory) / tag).is_dir() else None


def _problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (cheap checks: the files exist, trainer.json parses), or None."""
    if not TAG_PATTERN.match(folder.name):
        return "is not a checkpoint tag"
    if not folder.is_dir():
        return "is missing"
    if not any(folder.glob("*model_states.pt")):
        return "is incomplete (no DeepSpeed model states)"
    state = folder / STATE_FILE
    if state.exists():  # a hypernetwork checkpoint from before the shared format has none
        try:
            json.loads(state.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"has a corrupt {STATE_FILE} ({str(err)[:80]})"
    return None


def valid_tags(directory: Path) -> list[str]:
    return [tag for tag in tags(directory) if _problem(Path(directory) / tag) is None]


def _choices(directory: Path, exclude: str = "") -> str:
    valid = [tag for tag in valid_tags(directory) if tag != exclude]
    latest = Path(directory) / "latest"
    if valid:
        return f"valid: {', '.join(valid)}; write one of them into {latest} to resume from it"
    return "no valid checkpoint is left; start a new run (without --resume, in a new output_dir)"


def has_checkpoints(directory: Path) -> bool:
    """An earlier run left something to resume from (or a `latest` that says so)."""
    return (Path(directory) / "latest").exists() or bool(valid_tags(directory))


def resume_tag(directory: Path) -> str | None:
    """The checkpoint to resume from: the one `latest` names, checked; None when there is none at all (a
    first save killed midway leaves an incomplete folder and no `latest`: nothing to resume either). A
    `latest` naming a missing, incomplete or corrupt checkpoint, or valid checkpoints without a `latest`, is a
    one-line error naming the valid ones: the user picks, since resuming from elsewhere or from step 0 would
    silently repeat or lose training."""
    directory = Path(directory)
    latest = directory / "latest"
    if not latest.is_file():
        if not valid_tags(directory):
            return None
        raise TransplantError(f"{directory} holds checkpoints but no `latest` file; {_choices(directory)}")
    tag = latest.read_text(errors="replace").strip()
    problem = _problem(directory / tag) if tag else "is empty"
    if problem is None:
        return tag
    raise TransplantError(f"{latest} names {tag[:40]!r}, which {problem}; {_choices(directory, tag)}")


def check_resume(directory: Path, resume: bool, missing: str = "error") -> str | None:
    """Before anything loads: the tag to resume from, or None to start at step 0. Without `resume`, an earlier
    run's checkpoints are refused (training from 0 would prune them); with it, a bad `latest` or checkpoint is
    refused (`resume_tag`), and no checkpoint at all is an error (`missing="error"`, distill's `--resume`) or
    a warning (`"warn"`, the hypernetwork's `resume: true` = continue when there is one)."""
    if not resume:
        if has_checkpoints(directory):
            raise TransplantError(f"{directory} holds checkpoints of an earlier run; pass --resume to "
                                  "continue it, or choose another output_dir")
        return None
    tag = resume_tag(directory)
    if tag is None:
        if missing == "error":
            raise TransplantError(f"--resume: there is no checkpoint in {directory} to continue from; run "
                                  "without --resume to start training")
        log.warning("no checkpoint in %s to resume from: starting at step 0", directory)
    return tag


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, directory: Path, step: int, state: dict[str, Any], rank: int, world_size: int) -> str:
    """Collective: every rank calls it; returns the tag once every rank has saved. `state` is the trainer's
    own (JSON-able, the same on every rank: data position, tokenizer round, ...)."""
    tag = tag_for(step)
    folder = Path(directory) / tag
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "rng": rng_state()}, folder / f"trainer_rank{rank}.pt")
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps({"step": step, **state}))
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, **state})
    if world_size > 1:
        torch.distributed.barrier()
    return tag


def prune(directory: Path, keep: int, saved: str) -> None:
    """Rank 0, after `save` returned `saved`: keep it and the newest `keep - 1` checkpoints older than it.
    Only when `latest` names `saved` (a save that did not complete prunes nothing); newer tags (a run resumed
    from an earlier one) are left alone."""
    if latest_tag(directory) != saved:
        log.warning("%s/latest does not name %s: no checkpoint pruned", directory, saved)
        return
    older = [tag for tag in tags(directory) if tag < saved]
    for tag in older[: max(len(older) - (max(keep, 1) - 1), 0)]:
        shutil.rmtree(Path(directory) / tag, ignore_errors=True)


def _safe_globals() -> list[type]:
    found = []
    for dotted in SAFE_DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is simply not allowed
            continue
    return found


def weights_only_load(path: Any, map_location: Any = None, **_: Any) -> Any:
    """`torch.load` that never runs pickled code: a file naming anything else, or one that is truncated or
    corrupt, is a one-line error."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc).strip()
            if "GLOBAL" not in text and "global" not in text:
                raise _unreadable(path, exc) from None
            detail = next(line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line)
            raise TransplantError(
                f"checkpoint file {path} holds more than weights ({detail[:160]}); it was not written by "
                "this trainer or was tampered with, so it is not loaded: delete that checkpoint folder and "
                "resume from an earlier one"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise _unreadable(path, exc) from None


def _unreadable(path: Any, exc: Exception) -> TransplantError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    return TransplantError(f"checkpoint file {path} is unreadable, truncated or corrupt ({reason})")


_TORCH_LOAD = torch.load


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Route every `torch.load` (DeepSpeed's checkpoint engine calls it with weights_only=False) through
    `weights_only_load` while the block runs."""
    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


def load(engine: Any, directory: Path, tag: str, rank: int) -> tuple[int, dict[str, Any]]:
    """Collective. Restores the engine and this rank's RNG from `tag` (from `check_resume`); returns (step,
    the trainer's state). Every file is read weights-only (module docstring): a checkpoint cannot run code."""
    folder = Path(directory) / tag
    try:
        with weights_only_loading():
            path, client = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise TransplantError(f"DeepSpeed found no checkpoint in {folder}")
        mine = folder / f"trainer_rank{rank}.pt"
        rng = weights_only_load(mine)["rng"] if mine.is_file() else None
    except TransplantError as err:
        raise TransplantError(f"{err}; {_choices(directory, tag)}") from None
    if rng is not None:
        set_rng_state(rng)
    else:  # world size changed (or a hypernetwork checkpoint from before the shared format)
        log.warning("no RNG state for rank %d in %s (different world size?); data position restored",
                    rank, tag)
    state = dict(client or {})
    step = int(state.pop("step"))
    log.info("resumed from %s (step %d)", folder, step)
    return step, state
