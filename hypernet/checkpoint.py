"""Hypernetwork checkpoints that resume exactly, on one process or many.

`<output_dir>/checkpoint/` holds DeepSpeed's tag folders (hypernetwork weights, ZeRO-sharded optimizer state,
LR schedule) plus, per rank, the torch RNG state, and next to them a plain `hypernet.safetensors` +
`config.json` (a usable hypernetwork at every checkpoint). The trainer's own state (step, the tokenizer round,
the corpus position at the start of that round, the log) travels as DeepSpeed client state. Batches and
negatives are drawn from RNGs keyed by (seed, step, micro-batch), so with the corpus position and the round
restored a resumed run repeats the uninterrupted one bit for bit. DeepSpeed writes `latest` after every shard
is on disk, so a run killed while saving resumes from the previous checkpoint. Only the newest tag is kept.
Tag names, `latest` handling and the weights-only loading (checkpoints are code-free) are the distillation
trainer's (`distill.checkpoint`), so both trainers resume the same, safe way.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distill.checkpoint import TAG_PREFIX, latest_tag, tag_for, weights_only_loading

log = logging.getLogger(__name__)



def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoint"


def _rng_tensors() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(engine: Any, directory: Path, step: int, client_state: dict[str, Any], rank: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    folder = Path(directory) / tag
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_rng_tensors(), str(folder / f"rng_rank{rank}.safetensors"))
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    return tag


def prune(directory: Path) -> None:
    """Delete every tag but the one `latest` names (rank 0, after a barrier)."""
    current = latest_tag(directory)
    for folder in Path(directory).glob(f"{TAG_PREFIX}*"):
        if folder.is_dir() and folder.name != current:
            shutil.rmtree(folder, ignore_errors=True)


def load(engine: Any, directory: Path, rank: int) -> dict[str, Any] | None:
    """Collective. Restores the engine and this rank's RNG; returns the client state, or None without one."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    with weights_only_loading():
        path, client = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if path is None:
        return None
    rng = Path(directory) / tag / f"rng_rank{rank}.safetensors"
    if rng.is_file():
        state = load_file(str(rng))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    else:
        log.warning("no RNG state for rank %d in %s (different number of processes?)", rank, tag)
    log.info("resumed from %s (step %d)", path, client["step"])
    return client
