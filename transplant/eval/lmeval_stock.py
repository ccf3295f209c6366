"""What makes a `transplant eval --tasks` number reproducible with stock lm-eval: the exact `lm_eval` command
line for each group of tasks run together, and the switch that keeps the libraries off the network.

Why a command per group: the bits-per-byte tasks run with `add_bos_token=False` (see `transplant.eval.lmeval`:
lm-eval would otherwise score a BOS that a SentencePiece-style tokenizer adds on encode as a text token), the
other tasks with the model's own default. Stock `lm_eval` takes one `add_bos_token` per run, so a user who
wants the same numbers runs one command per group; printing them is the only way they can know.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

COMMAND_FILE = "lm_eval_command.txt"
OFFLINE_ENV = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "


@dataclass(frozen=True)
class StockRun:
    """One `simple_evaluate` call as the tool made it: enough to write the stock command that repeats it."""

    model_dir: Path
    tasks: tuple[str, ...]
    add_bos_token: bool | None
    dtype: str
    device: str
    batch_size: int | str
    include_path: Path | None = None
    limit: int | float | None = None
    max_length: int | None = None
    num_fewshot: int | None = None
    trust_remote_code: bool = False
    offline: bool = True


def model_args(run: StockRun) -> str:
    """`--model_args` of the hf model, `add_bos_token` spelled out whenever the tool set it."""
    args = [f"pretrained={run.model_dir}", f"dtype={run.dtype}"]
    if run.add_bos_token is not None:
        args.append(f"add_bos_token={run.add_bos_token}")
    if run.max_length:
        args.append(f"max_length={int(run.max_length)}")
    if run.trust_remote_code:
        args.append("trust_remote_code=True")
    return ",".join(args)


def stock_command(run: StockRun) -> str:
    """The shell line that makes stock `lm_eval` compute the numbers this run computed.

    Bootstrapped stderr estimates may differ in the last digits: the tool bootstraps 1000 times, stock 100000.
    """
    parts = ["lm_eval", "--model", "hf", "--model_args", model_args(run), "--tasks", ",".join(run.tasks)]
    if run.include_path is not None:
        parts += ["--include_path", str(run.include_path)]
    parts += ["--device", run.device, "--batch_size", str(run.batch_size)]
    if run.limit is not None:
        parts += ["--limit", str(run.limit)]
    if run.num_fewshot is not None:
        parts += ["--num_fewshot", str(run.num_fewshot)]
    return (OFFLINE_ENV if run.offline else "") + shlex.join(parts)


def command_file_text(runs: Sequence[StockRun]) -> str:
    """The text of `lm_eval_command.txt`: a comment line, then one command per model and group of tasks."""
    lines = ["# stock lm-eval commands that reproduce these numbers (bits-per-byte tasks: "
             "add_bos_token=False, so a BOS the tokenizer adds is not scored as text)"]
    return "\n".join(lines + [stock_command(run) for run in runs]) + "\n"


def write_command_file(folder: Path, runs: Sequence[StockRun]) -> Path:
    """Write `folder/lm_eval_command.txt` (atomically) and return its path."""
    return write_atomic(folder / COMMAND_FILE, command_file_text(runs))


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for sharing
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Keep huggingface_hub, datasets and transformers off the network for the duration.

    The env vars alone are not enough once those libraries are imported (they read them at import time), so
    the module-level switches are patched too and everything is restored afterwards.
    """
    env_vars = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {var: os.environ.get(var) for var in env_vars}
    patched: list[tuple[object, str, object]] = []
    import datasets.config
    import huggingface_hub.constants

    for module, attr in ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (datasets.config, "HF_DATASETS_OFFLINE")):
        if hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    os.environ.update({var: "1" for var in env_vars})
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
