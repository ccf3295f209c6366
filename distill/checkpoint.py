"""Checkpoints that resume exactly: DeepSpeed's model/optimizer/scheduler state plus, per rank, the data
position and the RNG states.

DeepSpeed writes its `latest` file only after every shard of a checkpoint is on disk, so a run killed while
saving resumes from the previous complete one. The per-rank trainer files are written into the tag folder
*before* DeepSpeed saves, for the same reason.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

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


def load(engine: Any, directory: Path, rank: int) -> tuple[int, dict[str, int]] | None:
    """Collective. Restores engine state and this rank's RNG; returns (step, loader state) or None."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        return None
    folder = Path(directory) / tag
    mine = folder / f"trainer_rank{rank}.pt"
    if mine.is_file():
        state = torch.load(mine, weights_only=True)
        set_rng_state(state["rng"])
        step, loader_state = int(state["step"]), dict(state["loader"])
    else:  # world size changed: data position is global, only the RNG is lost
        saved = json.loads((folder / "trainer.json").read_text())
        step, loader_state = int(saved["step"]), dict(saved["loader"])
        log.warning("no RNG state for rank %d in %s (different world size); data position restored", rank, tag)
    log.info("resumed from %s (step %d)", folder, step)
    return step, loader_state
