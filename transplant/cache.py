"""Where tokentransplant keeps what it fetched or built once (assets, converted tokenizers, learned poolers).

Bottom layer next to `errors`: every layer may cache, so the location lives below all of them.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache: $TOKENTRANSPLANT_CACHE, else ~/.cache/tokentransplant (created on first use)."""
    root = os.environ.get("TOKENTRANSPLANT_CACHE") or os.path.join(Path.home(), ".cache", "tokentransplant")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
