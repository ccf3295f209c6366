"""A frozen causal LM (the distillation teacher, the hypernetwork's base LM): replicated on every rank, or
sharded so that a model larger than one device works. Both trainers load theirs with `load_frozen`.

`teacher.shard` in a distillation recipe (`lm_shard` in a hypernetwork one):
- `none`: every rank holds the whole teacher (fastest while it fits next to the student).
- `zero3`: a ZeRO-3 inference engine (DeepSpeed, no optimizer): each rank holds 1/N of every weight and the
  layers are gathered one at a time during the forward, so the teacher needs ~1/N of its size per device plus
  one layer. Every rank must run the same number of teacher forwards (they do: one per micro-batch and the
  same held-out text).
- `offload`: ZeRO-3 with the parameters in CPU RAM (`offload_param`), streamed to the device layer by layer:
  a 70B teacher next to the student on a single 80 GB GPU, at the cost of host-to-device bandwidth.
The teacher is loaded partitioned (`zero.Init` through transformers' HfDeepSpeedConfig), so no rank ever
materialises it whole; the student's own ZeRO settings are untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

SHARD_MODES = ("none", "zero3", "offload")


def teacher_ds_config(mode: str, micro_batch_size: int, world_size: int,
                      dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config of the teacher's inference engine."""
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0,
                            "stage3_prefetch_bucket_size": 50_000_000,
                            "stage3_max_live_parameters": 1_000_000_000}
    if mode == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load_frozen(model_dir: Path, mode: str, dtype: torch.dtype, device: torch.device, *,
                micro_batch_size: int, world_size: int, trust_remote_code: bool = False,
                key: str = "teacher.shard", ) -> tuple[torch.nn.Module, Any]:
    """(the model in eval mode with frozen weights, its ZeRO-3 engine or None). Under `zero3`/`offload` the
    module is the engine's (calling it gathers the weights it needs, in the forward and, when a loss
    backpropagates through it into its inputs, in the backward); keep the engine referenced. `key` names
    the recipe key in the error for an unknown mode."""
    from transformers import AutoModelForCausalLM

    if mode not in SHARD_MODES:
        raise TransplantError(f"{key}={mode!r} is unknown; use one of {', '.join(SHARD_MODES)}")
    if mode == "none":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
        return model.to(device).eval().requires_grad_(False), None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = teacher_ds_config(mode, micro_batch_size, world_size, dtype)
    hf_config = HfDeepSpeedConfig(config)  # from_pretrained partitions the weights as it loads them
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
        model.requires_grad_(False)
        engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    finally:
        del hf_config
        unset_hf_deepspeed_config()
    log.info("%s sharded over %d rank(s) (ZeRO-3%s)", model_dir, world_size,
             ", parameters offloaded to CPU" if mode == "offload" else "")
    return engine.module.eval(), engine
