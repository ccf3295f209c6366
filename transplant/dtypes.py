"""Floating dtypes by the names users type (`--dtype bf16`, `dtype: bfloat16` in a recipe), in one table."""

from __future__ import annotations

import torch

from transplant.errors import TransplantError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype for `name`, or a one-line error listing the names."""
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise TransplantError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None
