"""Turn what the user typed (alias, local path, hub id) into a local model dir or a tokenizer-only donor."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transplant import assets
from transplant.errors import TransplantError

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]


@dataclass
class Source:
    spec: str  # what the user typed
    model_dir: Path | None  # local dir with config.json + safetensors, when it is a model
    tokenizer_spec: str | Path  # what `load_vocab` should read

    @property
    def is_model(self) -> bool:
        return self.model_dir is not None


def _has_weights(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors"))


def _download_hub(hub_id: str, spec: str, tokenizer_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt"] if tokenizer_only else HUB_PATTERNS
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as err:  # hub errors come in many classes; all mean "not reachable / not there"
        raise assets.hub_error(spec, hub_id, err) from err


def resolve_source(spec: str | Path, *, need_model: bool, tokenizer_only_ok: bool = True) -> Source:
    """Resolve a base (need_model=True) or donor spec. Tokenizer aliases are donors without weights."""
    text = str(spec)
    if text in assets.TOKENIZERS:
        if need_model:
            raise TransplantError(
                f"{text!r} is a tokenizer, not a model; the base must be a model (e.g. smollm2-135m or a model dir)"
            )
        return Source(text, None, text)
    resolved = assets.resolve_model(text)
    if isinstance(resolved, str):  # a hub id
        local = _download_hub(resolved, text, tokenizer_only=not need_model and tokenizer_only_ok)
        resolved = local
    path = Path(resolved)
    if _has_weights(path):
        return Source(text, path, path)
    if need_model:
        if path.is_dir() and (path / "config.json").exists():
            raise TransplantError(
                f"{path} has no .safetensors weights; only safetensors are read (convert with "
                "`model.save_pretrained(dir, safe_serialization=True)`)"
            )
        raise TransplantError(f"{path} is not a model dir (needs config.json and *.safetensors); pass a model dir")
    return Source(text, None, path)
