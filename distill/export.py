"""The trained student as a plain Hugging Face dir: safetensors weights, config, the student's tokenizer files.

Under ZeRO-3 every rank holds a slice of each weight, so the full 16-bit state dict is gathered onto rank 0
(a collective: every rank must call `gather_state_dict`). LoRA adapters are merged into their weights and tied
output embeddings are written once, so `AutoModelForCausalLM.from_pretrained(dir)` loads it with no extras.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distill.lora import lora_scales, merge_lora_state_dict
from transplant.tokenizers.files import TOKENIZER_FILES

log = logging.getLogger(__name__)

SHARD_BYTES = 5 * 1024**3


def gather_state_dict(engine: Any, stage: int, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (None elsewhere), on CPU."""
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if is_main else None
    if not is_main or state is None:
        return None
    return {name: tensor.detach().to("cpu") for name, tensor in state.items()}


def _output_key(model: torch.nn.Module) -> str | None:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is output:
            return f"{name}.weight"
    return None


def _shards(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += nbytes
    return shards + [current] if current else shards


def write_hf_dir(model: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer_dir: Path, out_dir: Path,
                 dtype: torch.dtype) -> Path:
    """Write `state` (+ config, generation config, tokenizer files) to `out_dir`, atomically."""
    state = merge_lora_state_dict(state, lora_scales(model))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    output_key = _output_key(model)
    if tied and output_key in state:
        del state[output_key]
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards = _shards(state)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata=metadata)
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            weight_map = {}
            for name, shard in zip(names, shards):
                save_file(shard, tmp / name, metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = model.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config["use_cache"] = True
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for pattern in ("generation_config.json", *TOKENIZER_FILES):
            for path in Path(tokenizer_dir).glob(pattern):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old"
            if old.exists():
                shutil.rmtree(old)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d tensors, %s)", out_dir, len(state), dtype)
    return out_dir
