"""Process setup for both trainers (distillation and hypernetwork): distributed environment, device and dtype,
the DeepSpeed engine and its config.

The same code runs as one CPU process started by plain python, as N processes under torchrun or the deepspeed
launcher, on CPUs (gloo) or GPUs (NCCL). Everything a launcher would set is given a default here, so a plain
`distill recipe.yaml` is a world of one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.config import Recipe, recipe_relative
from transplant.dtypes import parse_dtype
from transplant.errors import TransplantError

log = logging.getLogger(__name__)

EXTENSIONS_DIR = Path("~/.cache/tokentransplant/torch_extensions").expanduser()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_environment() -> None:
    """Defaults for what launchers set, and a persistent cache for DeepSpeed's JIT-built ops (the CPU shm comm
    op takes ~35-70 s to compile with g++ the first time; with the cache later starts take a second)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def launch_environment() -> Iterator[None]:
    """Run a trainer from Python and leave the process's environment as it was: `prepare_environment` sets
    RANK, WORLD_SIZE and MASTER_PORT for a one-process run, and a subprocess started afterwards (a stock
    `lm_eval`, a second training job) would inherit them and try to join or bind that port (EADDRINUSE).
    The process group itself stays up, so a second run in the same process reuses it."""
    before = {var: os.environ.get(var) for var in LAUNCH_VARS}
    try:
        yield
    finally:
        for var, value in before.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # training dtype of the trained weights

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on GPUs that support it, else fp32 (CPU bf16 matmuls are slow and DeepSpeed's CPU path
    is tested in fp32)."""
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return parse_dtype(name)


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(recipe: Recipe) -> torch.dtype | None:
    if recipe.train.autocast not in AUTOCAST:
        raise TransplantError(f"train.autocast={recipe.train.autocast!r} is unknown; use one of "
                              f"{', '.join(AUTOCAST)}")
    return AUTOCAST[recipe.train.autocast]


def start_runtime(device: str = "auto", dtype: str = "auto", *, tf32: bool = True) -> Runtime:
    """Launcher defaults, the device (`auto`: CUDA when torch sees one, one GPU per local rank; `tf32` allows
    TF32 matmuls there), the process group (NCCL on CUDA, gloo on CPU) and the weight dtype
    (`resolve_dtype`)."""
    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise TransplantError("recipe key device=cuda but torch sees no CUDA GPU; use device=auto or cpu")
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick a GPU on its own
    prepare_environment()
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    where = torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return Runtime(rank, world, local_rank, where, resolve_dtype(dtype, where))


def init_runtime(recipe: Recipe) -> Runtime:
    """The distillation trainer's runtime: the student's weight dtype is fp32 under `train.autocast` (the
    forward casts, the weights and their optimizer state stay fp32)."""
    autocast = autocast_dtype(recipe)
    if autocast is not None and recipe.student.dtype not in ("auto", "float32", "fp32"):
        raise TransplantError(f"train.autocast={recipe.train.autocast} keeps fp32 weights; set "
                              "student.dtype=auto "
                              f"or float32 (not {recipe.student.dtype})")
    runtime = start_runtime("auto", recipe.student.dtype)
    if autocast is not None:
        runtime.dtype = torch.float32
    return runtime


def engine_config(base: dict[str, Any], *, micro_batch_size: int, grad_accum: int, world_size: int,
                  grad_clip: float, dtype: torch.dtype) -> dict[str, Any]:
    """A DeepSpeed config: `base` (a recipe's JSON, or a trainer's own settings) with the batch geometry,
    clipping and precision that the recipe decides filled in."""
    config = copy.deepcopy(base)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = micro_batch_size * grad_accum * world_size
    config["gradient_clipping"] = float(grad_clip)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    config["bf16"] = {**config.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    config["fp16"] = {**config.get("fp16", {}), "enabled": dtype == torch.float16}
    return config


def deepspeed_engine(model: torch.nn.Module, optimizer: Any, scheduler: Any, config: dict[str, Any]) -> Any:
    """The DeepSpeed engine training `model` with a torch optimizer and schedule built by the trainer."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    return engine


def load_deepspeed_config(recipe: Recipe, runtime: Runtime) -> dict[str, Any]:
    """The recipe's DeepSpeed JSON with the batch geometry, clipping and precision filled in from the recipe.

    The optimizer is always a torch object built by the trainer: an `optimizer` section in the JSON would make
    DeepSpeed build its own (and JIT-compile fused Adam for minutes), so it is refused.
    """
    path = recipe_relative(recipe, recipe.deepspeed)
    if not path.is_file():
        raise TransplantError(f"DeepSpeed config {recipe.deepspeed} not found; point `deepspeed:` at a JSON "
                              "such as recipes/deepspeed/zero0_cpu.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TransplantError(f"DeepSpeed config {path} is not valid JSON ({err.msg}); fix it") from err
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise TransplantError(f"{path} has a `{section}` section; remove it: the optimizer and schedule "
                                  "come from the recipe's `optim:` keys")
    train = recipe.train
    config = engine_config(config, micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum,
                           world_size=runtime.world_size, grad_clip=recipe.optim.grad_clip,
                           dtype=runtime.dtype)
    autocast = autocast_dtype(recipe)
    if autocast is not None:  # DeepSpeed runs the forward under torch.autocast; reductions in the low dtype
        config["torch_autocast"] = {**config.get("torch_autocast", {}), "enabled": True,
                                    "dtype": str(autocast).removeprefix("torch.")}
    zero = config.setdefault("zero_optimization", {"stage": 0})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def peak_memory() -> dict[str, float]:
    """Peak host RSS (and GPU memory) of this process so far, for the per-step record."""
    import resource

    # KiB on Linux
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def format_record(record: dict[str, Any]) -> str:
    """A metrics record as one log line."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if k != "step")
