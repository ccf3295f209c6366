"""Low-rank adapters (LoRA) on a model's linear layers, merged back into plain weights at export.

Written here rather than taken from peft so that the parameter names stay those of the base model
(`...q_proj.weight` plus `...q_proj.lora_A` / `lora_B`): checkpoints, ZeRO-3 gathering and the export need no
name mapping, and the exported dir is a stock model with no adapter files.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from transplant.errors import TransplantError

log = logging.getLogger(__name__)


class LoRALinear(nn.Linear):
    """nn.Linear plus `scale * B @ A` (B starts at zero, so the model is unchanged until it trains)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.lora_scale


def _attach(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
    weight = linear.weight
    shape_in, shape_out = linear.in_features, linear.out_features
    a = torch.empty(rank, shape_in, dtype=weight.dtype, device=weight.device if weight.numel() else "cpu")
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    linear.lora_A = nn.Parameter(a)
    linear.lora_B = nn.Parameter(torch.zeros(shape_out, rank, dtype=a.dtype, device=a.device))
    linear.lora_scale = alpha / rank
    linear.lora_dropout = dropout
    linear.__class__ = LoRALinear


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Freeze `model` and give every nn.Linear whose name ends with one of `targets` an adapter.

    Returns the adapted module names. The output embedding (lm_head) is never adapted: it is trained in full
    or frozen through `train_embeddings` in the recipe.
    """
    if rank <= 0:
        raise TransplantError(f"lora.rank={rank} must be positive; use e.g. 8 or 16")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for param in model.parameters():
        param.requires_grad_(False)
    adapted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module is not output and name.split(".")[-1] in targets:
            _attach(module, rank, alpha, dropout)
            adapted.append(name)
    if not adapted:
        raise TransplantError(f"lora.targets={list(targets)} match no linear layer of this model; "
                              "name the last component of a module, e.g. q_proj")
    log.info("LoRA rank %d on %d linear layers", rank, len(adapted))
    return adapted


def merge_lora_state_dict(state: dict[str, torch.Tensor],
                          scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Fold `lora_A`/`lora_B` pairs into their `weight` (in fp32, cast back) and drop the adapter tensors."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for module_name, scale in scales.items():
        a, b = state.get(f"{module_name}.lora_A"), state.get(f"{module_name}.lora_B")
        if a is None or b is None:
            continue
        weight = merged[f"{module_name}.weight"]
        merged[f"{module_name}.weight"] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
    return merged


def lora_scales(model: nn.Module) -> dict[str, float]:
    return {name: m.lora_scale for name, m in model.named_modules() if isinstance(m, LoRALinear)}
