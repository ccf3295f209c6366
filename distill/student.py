"""The student: made by `transplant` when the recipe says how, loaded ready to train, its vocabulary checked.

What the trainer needs before DeepSpeed wraps the model: the folder (an alias or hub id resolved), the model
with the recipe's training switches (no KV cache, gradient checkpointing, LoRA adapters with the embeddings
kept trainable when asked), and a start-up check that the tokenizer's ids fit the embedding rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from distill.config import Recipe
from distill.lora import apply_lora
from transplant.errors import TransplantError

log = logging.getLogger(__name__)


def embedding_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not params[0]:
        params.append(output.weight)
    return params


def resolve_model_dir(spec: str) -> Path:
    from transplant.assets.sources import resolve_source

    return Path(resolve_source(spec, need_model=True).model_dir)


def prepare_student(recipe: Recipe, is_main: bool, timeout_s: float = 3600.0) -> None:
    """Create the student with `transplant` when its dir is missing and the recipe says how (rank 0 builds it,
    the others wait for the atomic rename)."""
    path, prep = Path(recipe.student.path), recipe.student.prepare
    if path.exists() or prep is None or not prep.base:
        return
    if is_main:
        from transplant.pipeline import transplant

        log.info("student %s missing: transplant(%s, %s, method=%s)", path, prep.base, prep.donor,
                 prep.method)
        transplant(prep.base, prep.donor, method=prep.method, output=path, options=dict(prep.options))
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TransplantError(f"student {path} did not appear; run the transplant command in the recipe")
        time.sleep(2)


def check_vocab(vocab: Any, config: Any, role: str, directory: Path) -> None:
    """Token ids beyond the embedding rows would crash mid-run (or read garbage on GPU): fail at start-up."""
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if rows is not None and len(vocab) > rows:
        raise TransplantError(f"{role} {directory}: its tokenizer has {len(vocab)} ids but the model only "
                              f"{rows} embedding rows; use the tokenizer saved with that model")


def load_student(recipe: Recipe, directory: Path, vocab: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The student model from `directory` as the recipe trains it (DeepSpeed wraps it next); fails at once if
    its tokenizer `vocab` has ids beyond its embedding rows."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                   trust_remote_code=recipe.student.trust_remote_code)
    student.config.use_cache = False
    check_vocab(vocab, student.config, "student", directory)
    if recipe.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if recipe.lora.enabled:
        lora = recipe.lora
        apply_lora(student, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets)
        if lora.train_embeddings:
            for param in embedding_params(student):
                param.requires_grad_(True)
    return student
