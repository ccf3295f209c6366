"""The trained student as a plain Hugging Face dir: safetensors weights, config, the student's tokenizer
files.

Under ZeRO-3 every rank holds a slice of each weight, so the full 16-bit state dict is gathered onto rank 0
(a collective: every rank must call `gather_state_dict`). LoRA adapters are merged into their weights and tied
output embeddings are written once, so `AutoModelForCausalLM.from_pretrained(dir)` loads it with no extras.
Weights go through the project's streaming safetensors writer (one tensor at a time, OS errors as one line).
Where a run writes is checked here too: the export folder (`check_export_dir`) and what `output_dir` may hold
for the run to claim it (`claim_terms`, for `transplant.io.claim`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from distill import checkpoint
from distill.config import Recipe
from distill.lora import lora_scales, merge_lora_state_dict
from transplant.io import safetensors
from transplant.io.atomic import atomic_output, check_output, existing_paths
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


def _planned(state: dict[str, torch.Tensor]) -> list[safetensors.PlannedTensor]:
    return [safetensors.plan_tensor(name, lambda t=tensor: t, tensor.dtype, tuple(tensor.shape))
            for name, tensor in state.items()]


def write_hf_dir(model: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer_dir: Path, out_dir: Path,
                 dtype: torch.dtype) -> Path:
    """Write `state` (+ config, generation config, tokenizer files) to `out_dir`, atomically.

    Through `transplant.io.atomic`: an existing `out_dir` is replaced only if it is an earlier export (or
    empty), never the student's own folder; a full disk or SIGTERM leaves nothing behind. Call
    `check_export_dir` at start-up so a bad `export.dir` fails before training, not after it."""
    state = merge_lora_state_dict(state, lora_scales(model))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    output_key = _output_key(model)
    if tied and output_key in state:
        del state[output_key]
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    planned = _planned(state)
    with atomic_output(out_dir, overwrite=True, protected=[tokenizer_dir], kind="distill-export",
                       estimate_bytes=sum(t.nbytes for t in planned)) as tmp:
        safetensors.write_shards(tmp, safetensors.split_into_shards(planned, SHARD_BYTES), {"format": "pt"})
        config = model.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config["use_cache"] = True
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for pattern in ("generation_config.json", *TOKENIZER_FILES):
            for path in Path(tokenizer_dir).glob(pattern):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
    log.info("exported %s (%d tensors, %s)", out_dir, len(state), dtype)
    return Path(out_dir)


def check_export_dir(out_dir: Path, protected: list[Path], estimate_bytes: int = 0) -> Path:
    """Fail at start-up, with one line, if the export could not be written at the end of training."""
    return check_output(out_dir, overwrite=True, protected=protected, estimate_bytes=estimate_bytes)


def claim_terms(recipe: Recipe, models: list[Path | str]) -> dict[str, Any]:
    """How `transplant.io.claim` judges `output_dir`: a `distill` folder holding only what training writes
    (metrics, the recipe, the window index, checkpoints and the export when they lie inside it), never one
    holding, or inside, the teacher, the student or a data file. An unmarked folder with checkpoints is a run
    from before markers, so `--resume` still continues it."""
    out = Path(recipe.output_dir).expanduser().absolute()
    layout = {"metrics.jsonl", "recipe.yaml", "window_index.json"}
    for place in (recipe.checkpoint.dir, recipe.export.dir):
        path = Path(place).expanduser().absolute()
        if out in path.parents:
            layout.add(path.relative_to(out).parts[0])
    named = [*models, *recipe.data.train, *recipe.eval.texts]
    return {"kind": "distill", "layout": sorted(layout), "protected": existing_paths(named),
            "adopt": checkpoint.has_checkpoints(Path(recipe.checkpoint.dir))}
