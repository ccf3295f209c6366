"""The trainer's optimizer and learning-rate schedule: parameter groups, warmups, and which Adam kernel runs.

- Groups: `embeddings` (input + output embeddings), `body` (everything else the student trains) and `loss`
  (trainable modules a loss adds, e.g. ALM's hidden-state projection). "Embeddings only for the first N steps"
  is a learning-rate factor of 0 for the body: ZeRO flattens parameter groups at start-up, so toggling
  `requires_grad` later would silently do nothing. When the body starts, it warms up again
  (`body_warmup_steps`, default `warmup_steps`) instead of jumping to full rate on weights that the new
  embeddings just moved under.
- Kernels (`optim.impl`): DeepSpeed configs that offload the optimizer to CPU need DeepSpeed's CPU Adam (a
  torch optimizer there fails: its step would run on the wrong device); on CUDA torch's fused AdamW is one
  kernel per step with no build; `deepspeed_fused` asks for DeepSpeed's FusedAdam (JIT-built, or prebuilt with
  DS_BUILD_FUSED_ADAM=1); on CPU the plain (foreach) torch AdamW is the fastest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "torch_fused", "deepspeed_fused", "deepspeed_cpu")


def lr_factor(step: int, optim: Any, total: int, warmup: int | None = None) -> float:
    """Multiplier of a group's base rate at `step` (0-based) of `total`: linear warmup, then the schedule."""
    warmup = optim.warmup_steps if warmup is None else warmup
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    floor = optim.min_lr_ratio
    if optim.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise TransplantError(f"optim.schedule={optim.schedule!r} is unknown; use cosine, linear or constant")


def body_lr_factor(step: int, optim: Any, total: int, embeddings_only: int) -> float:
    """0 during the embeddings-only phase, then a fresh warmup and the schedule over the remaining steps."""
    if step < embeddings_only:
        return 0.0
    warmup = optim.warmup_steps if optim.body_warmup_steps is None else optim.body_warmup_steps
    return lr_factor(step - embeddings_only, optim, total - embeddings_only, warmup)


def param_groups(embeddings: list[torch.nn.Parameter], body: list[torch.nn.Parameter],
                 loss_params: list[torch.nn.Parameter], recipe: Any) -> tuple[list[dict], list[Callable]]:
    """Optimizer groups and their LambdaLR factors (see the module docstring)."""
    optim, total, warm_emb = recipe.optim, recipe.train.steps, recipe.train.embeddings_only_steps
    if warm_emb and not embeddings:
        raise TransplantError("train.embeddings_only_steps > 0 but no embedding is trainable; "
                              "set lora.train_embeddings=true or embeddings_only_steps=0")
    groups, lambdas = [], []
    if embeddings:
        groups.append({"params": embeddings, "lr": optim.embedding_lr or optim.lr, "name": "embeddings"})
        lambdas.append(lambda s: lr_factor(s, optim, total))
    if body:
        groups.append({"params": body, "lr": optim.lr, "name": "body"})
        lambdas.append(lambda s: body_lr_factor(s, optim, total, warm_emb))
    if loss_params:
        groups.append({"params": loss_params, "lr": optim.embedding_lr or optim.lr, "name": "loss"})
        lambdas.append(lambda s: lr_factor(s, optim, total))
    if not groups:
        raise TransplantError("nothing to train: every parameter is frozen; check the lora settings")
    return groups, lambdas


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def choose_impl(impl: str, ds_config: dict[str, Any], device: torch.device) -> str:
    if impl not in IMPLS:
        raise TransplantError(f"optim.impl={impl!r} is unknown; use one of {', '.join(IMPLS)}")
    if offloads_optimizer(ds_config):
        if impl not in ("auto", "deepspeed_cpu"):
            raise TransplantError("the DeepSpeed config offloads the optimizer, which needs "
                                  "DeepSpeed's CPU Adam; "
                                  f"set optim.impl=auto (not {impl})")
        return "deepspeed_cpu"
    if impl == "auto":
        return "torch_fused" if device.type == "cuda" else "torch"
    if impl in ("torch_fused", "deepspeed_fused") and device.type != "cuda":
        raise TransplantError(f"optim.impl={impl} needs a CUDA device; use optim.impl=auto on CPU")
    return impl


def build_optimizer(groups: list[dict], recipe: Any, ds_config: dict[str, Any],
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) with the kernel `choose_impl` picks."""
    optim = recipe.optim
    impl = choose_impl(optim.impl, ds_config, device)
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps,
              "weight_decay": optim.weight_decay}
    log.info("optimizer: AdamW (%s)", impl)
    if impl == "deepspeed_cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if impl == "deepspeed_fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=impl == "torch_fused" or None, **kwargs)
