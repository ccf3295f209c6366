"""Hugging Face hub downloads that fetch only what the run needs, one file at a time.

A transplant reads a base model whole, but of a donor only its tokenizer and, for donor methods (omp, knn,
...), its embedding matrices. A 70B donor's weights are ~140 GB, its embeddings one shard of them, so a donor
model is fetched as: tokenizer files + config.json + the shard(s) that `model.safetensors.index.json` says
hold the embedding matrices (`transplant.assets.weight_names`). Those files are then shown to the surgery
through a small "view" folder (links to the downloaded files and an index restricted to the shards that are
there), because a folder whose index names missing shards is refused as damaged, rightly.

Every download names the file (`huggingface_hub.hf_hub_download`) and the `revision` (branch, tag or commit);
nothing here runs code from the hub. The file list comes from `list_repo_files`; offline
(HF_HUB_OFFLINE), files already in the hub cache are used when they are there.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from transplant.assets import catalog
from transplant.assets.weight_names import embedding_names
from transplant.cache import cache_dir
from transplant.errors import TransplantError
from transplant.tokenizers.files import TOKENIZER_FILES

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
TOKENIZER_PATTERNS = (*TOKENIZER_FILES, "*.tiktoken", "config.json")  # config.json: AutoTokenizer may need it
MODEL_PATTERNS = (*TOKENIZER_PATTERNS, "generation_config.json", "*.safetensors", INDEX, "*.py", "LICENSE*",
                  "NOTICE*", "USE_POLICY*", "preprocessor_config.json", "processor_config.json",
                  "video_preprocessor_config.json")
PROBE_SECONDS = 2.0  # one TCP connect to the hub before any download; a silent network fails fast

# What to try when the file list cannot be fetched (offline): files a hub cache may already hold.
OFFLINE_CANDIDATES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                      "added_tokens.json", "chat_template.jinja", "tekken.json", INDEX, "model.safetensors")


def _matching(files: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Top-level files (no subfolder) matching any of `patterns`, in the hub's order."""
    patterns = tuple(patterns)
    return [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in patterns)]


def _list_files(hub_id: str, spec: str, revision: str | None, role: str) -> list[str] | None:
    """The repository's file list, or None offline (then cached files are tried by name)."""
    import huggingface_hub

    if not catalog.offline_by_environment() and catalog.is_hub_offline(timeout=PROBE_SECONDS):
        # one short probe instead of huggingface_hub's retries (26 s of warnings before the same error)
        host = catalog.hub_host()[0]
        raise catalog.hub_error(spec, hub_id, OSError(
            f"{host} did not answer within {PROBE_SECONDS:g} s (HF_HUB_OFFLINE=1 uses the files already in "
            "the hub cache)"), role=role, revision=revision)
    try:
        return list(huggingface_hub.list_repo_files(hub_id, revision=revision))
    except Exception as err:  # hub errors come in many classes; all mean "not reachable / not there"
        if catalog.offline_by_environment():
            log.info("offline: using the files of %s already in the hub cache", hub_id)
            return None
        raise catalog.hub_error(spec, hub_id, err, role=role, revision=revision) from err


def _download(hub_id: str, spec: str, names: Iterable[str], revision: str | None, role: str, *,
              required: Iterable[str] = ()) -> dict[str, Path]:
    """Download `names` one by one; a name in `required` that fails is an error, other failures are skipped
    (they come from the offline candidate list)."""
    import huggingface_hub

    required = set(required)
    paths: dict[str, Path] = {}
    for name in dict.fromkeys(names):
        try:
            paths[name] = Path(huggingface_hub.hf_hub_download(hub_id, name, revision=revision))
        except Exception as err:
            if name in required:
                raise catalog.hub_error(spec, hub_id, err, role=role, revision=revision) from err
            log.debug("%s: %s not available (%s)", hub_id, name, type(err).__name__)
    return paths


def _snapshot(paths: dict[str, Path], hub_id: str) -> Path:
    folders = {path.parent for path in paths.values()}
    if len(folders) != 1:
        raise TransplantError(f"the hub cache holds the files of {hub_id} in several folders; clear "
                              "the cache entry for it and retry")
    return folders.pop()


def fetch_tokenizer(hub_id: str, spec: str, revision: str | None = None) -> Path:
    """A folder with the repository's tokenizer files (and config.json) only."""
    files = _list_files(hub_id, spec, revision, "donor")
    names = _matching(files, TOKENIZER_PATTERNS) if files is not None else OFFLINE_CANDIDATES[:12]
    paths = _download(hub_id, spec, names, revision, "donor")
    if not paths:
        raise TransplantError(f"{hub_id} has no tokenizer files (tokenizer.json, "
                              "tokenizer.model, ...); pass a tokenizer or model repository")
    return _snapshot(paths, hub_id)


def fetch_model(hub_id: str, spec: str, revision: str | None = None) -> Path:
    """A complete model folder: config, every safetensors shard, tokenizer, licence, processor and code files
    (code is downloaded, never run here: the surgery copies it beside the weights)."""
    files = _list_files(hub_id, spec, revision, "base")
    if files is None:
        paths = _download(hub_id, spec, OFFLINE_CANDIDATES, revision, "base", required=("config.json",))
        paths.update(_download(hub_id, spec, _index_shards(paths.get(INDEX)), revision, "base"))
    else:
        paths = _download(hub_id, spec, _matching(files, MODEL_PATTERNS), revision, "base",
                          required=("config.json",))
    return _snapshot(paths, hub_id)


def _index_shards(index: Path | None, tensors: Iterable[str] | None = None) -> list[str]:
    """Shard files an index names (all, or those holding `tensors`)."""
    if index is None:
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TransplantError(f"{index} is unreadable ({err}); clear its hub cache entry and retry") from err
    wanted = weight_map if tensors is None else {t: weight_map[t] for t in tensors if t in weight_map}
    return sorted(set(wanted.values()))


def embedding_shards(index: Path) -> tuple[list[str], list[str]]:
    """(shards holding embedding matrices by name, every shard) of a sharded checkpoint's index."""
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    return _index_shards(index, embedding_names(weight_map)), _index_shards(index)


def fetch_embeddings(hub_id: str, spec: str, revision: str | None = None) -> Path:
    """Tokenizer files, config.json and only the safetensors shard(s) holding the embedding matrices, as a
    folder the surgery can read (module docstring)."""
    files = _list_files(hub_id, spec, revision, "donor")
    listed = set(files) if files is not None else None
    names = _matching(files, TOKENIZER_PATTERNS) if files is not None else list(OFFLINE_CANDIDATES[:12])
    paths = _download(hub_id, spec, [*names, "config.json"], revision, "donor", required=("config.json",))
    if listed is None or INDEX in listed:
        paths.update(_download(hub_id, spec, [INDEX], revision, "donor",
                               required=() if listed is None else (INDEX,)))
    if INDEX in paths:
        shards, every = embedding_shards(paths[INDEX])
        if not shards:
            log.warning("%s: no tensor in %s is named like an embedding; downloading all %d shards", hub_id,
                        INDEX, len(every))
            shards = every
        log.info("%s: downloading %d of %d shard(s), the ones holding the embeddings: %s", hub_id,
                 len(shards), len(every), ", ".join(shards))
        paths.update(_download(hub_id, spec, shards, revision, "donor", required=shards))
        snapshot = _snapshot(paths, hub_id)
        return snapshot if len(shards) == len(every) else _view(snapshot, paths, shards, hub_id)
    singles = _matching(files, ("*.safetensors",)) if files is not None else ["model.safetensors"]
    if not singles:
        raise TransplantError(f"{hub_id} has no safetensors weights; use a method that needs "
                              "only the donor's tokenizer (--method fvt) or a donor with safetensors weights")
    log.info("%s: its weights are one file (%s); downloading it whole for the embeddings", hub_id, singles[0])
    paths.update(_download(hub_id, spec, singles, revision, "donor",
                           required=singles if files is not None else ()))
    return _snapshot(paths, hub_id)


def _view(snapshot: Path, paths: dict[str, Path], shards: list[str], hub_id: str) -> Path:
    """A folder of links to the downloaded files with an index listing only the tensors of `shards`."""
    view = cache_dir() / "hub-embeddings" / hub_id.replace("/", "--") / snapshot.name
    weight_map = json.loads(paths[INDEX].read_text(encoding="utf-8"))["weight_map"]
    kept = {name: shard for name, shard in weight_map.items() if shard in shards}
    tmp = view.with_name(f".{view.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        if name != INDEX:
            link = tmp / name
            if not link.exists():
                link.symlink_to(path.resolve())
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": kept}, indent=1) + "\n",
                             encoding="utf-8")
    if view.exists():
        import shutil

        shutil.rmtree(view, ignore_errors=True)
    tmp.rename(view)
    return view
