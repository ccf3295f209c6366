"""Checkpoints that resume exactly: DeepSpeed's model/optimizer/scheduler state plus, per rank, the data
position and the RNG states.

DeepSpeed writes its `latest` file only after every shard of a checkpoint is on disk, so a run killed while
saving resumes from the previous complete one. The per-rank trainer files are written into the tag folder
*before* DeepSpeed saves, for the same reason.

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


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def latest_tag(directory: Path) -> str | None:
    latest = Path(directory) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (Path(directory) / tag).is_dir() else None


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


def save(engine: Any, directory: Path, step: int, loader_state: dict[str, int], rank: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    folder = Path(directory) / tag
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "loader": loader_state, "rng": rng_state()}, folder / f"trainer_rank{rank}.pt")
    if rank == 0:
        (folder / "trainer.json").write_text(json.dumps({"step": step, "loader": loader_state}))
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, "loader": loader_state})
    return tag


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names). Rank 0 only, after a barrier."""
    current = latest_tag(directory)
    tags = sorted(p.name for p in Path(directory).glob(f"{TAG_PREFIX}*") if p.is_dir())
    for tag in tags[: max(len(tags) - max(keep, 1), 0)]:
        if tag != current:
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
    """`torch.load` that never runs pickled code: a file naming anything else is a one-line error."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line),
                          str(exc).strip().splitlines()[0] if str(exc).strip() else "not a weights-only file")
            raise TransplantError(
                f"checkpoint file {path} holds more than weights ({detail[:160]}); it was not written by this "
                "trainer or was tampered with, so it is not loaded: delete that checkpoint folder and resume from "
                "an earlier one"
            ) from None


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


def load(engine: Any, directory: Path, rank: int) -> tuple[int, dict[str, int]] | None:
    """Collective. Restores engine state and this rank's RNG; returns (step, loader state) or None.

    Every file is read weights-only (module docstring): a checkpoint cannot run code on resume."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    with weights_only_loading():
        path, client = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if path is None:
        return None
    folder = Path(directory) / tag
    mine = folder / f"trainer_rank{rank}.pt"
    if mine.is_file():
        state = weights_only_load(mine)
        set_rng_state(state["rng"])
        step, loader_state = int(state["step"]), dict(state["loader"])
    else:  # world size changed: data position is global, only the RNG is lost
        saved = json.loads((folder / "trainer.json").read_text())
        step, loader_state = int(saved["step"]), dict(saved["loader"])
        log.warning("no RNG state for rank %d in %s (different world size); data position restored", rank, tag)
    log.info("resumed from %s (step %d)", folder, step)
    return step, loader_state
