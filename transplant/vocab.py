"""Tokenizers as byte strings.

Every tokenizer family spells tokens differently (`▁word`, `Ġword`, raw bytes, `<0x0A>`). A `Vocab` turns any of
them into the exact bytes each id contributes to decoded text, so that matching, initialisation and distillation
work on bytes, never on a family's spelling.

CONTRACT (skeleton written first so that every module builds against the same shape; loaders are filled in by
the vocab work).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any


class TokenKind(str, Enum):
    NORMAL = "normal"  # a piece of text; its bytes are what it decodes to (leading space included)
    BYTE = "byte"  # a byte-fallback token such as `<0x0A>`; its bytes are that one byte
    SPECIAL = "special"  # control token (bos, eos, chat markers); no bytes in decoded text


@dataclass
class Vocab:
    """A tokenizer plus, for every id, its exact bytes, its kind and (for specials) its role."""

    tokenizer: Any  # transformers.PreTrainedTokenizerFast whose ids equal the family's reference implementation
    token_bytes: list[bytes]  # per id; b"" for specials
    kinds: list[TokenKind]  # per id
    roles: dict[str, int]  # role -> id: "bos", "eos", "pad", "unk", and chat markers ("im_start", ...)
    name: str = ""
    source_format: str = ""  # "hf", "tokenizer.json", "sentencepiece", "tiktoken", "tekken", "gguf"
    adds_prefix_space: bool = False  # SentencePiece dummy prefix: encode("a") starts with the bytes of " a"
    special_texts: dict[int, str] = field(default_factory=dict)  # id -> literal text of a special token

    def __len__(self) -> int:
        return len(self.token_bytes)

    @cached_property
    def bytes_to_id(self) -> dict[bytes, int]:
        """Normal and byte-fallback tokens by their bytes (the first id wins on duplicates)."""
        table: dict[bytes, int] = {}
        for idx, (piece, kind) in enumerate(zip(self.token_bytes, self.kinds)):
            if kind is not TokenKind.SPECIAL and piece not in table:
                table[piece] = idx
        return table

    @cached_property
    def role_of(self) -> dict[int, str]:
        return {idx: role for role, idx in self.roles.items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer files that stock `AutoTokenizer` (transformers 4.x and 5.x) loads with the same ids."""
        raise NotImplementedError


def load_vocab(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> Vocab:
    """Load a tokenizer from an alias, HF dir/hub id, tokenizer.json, SentencePiece .model, tiktoken, tekken, GGUF."""
    raise NotImplementedError(str(Path(spec)))
