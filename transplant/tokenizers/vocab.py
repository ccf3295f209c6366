"""Tokenizers as byte strings.

Every tokenizer family spells tokens differently (`▁word`, `Ġword`, raw bytes, `<0x0A>`). A `Vocab` turns any
of them into the exact bytes each id contributes to decoded text, so that matching, initialisation and
distillation work on bytes, never on a family's spelling.

What `token_bytes` means per family (derived from the fast tokenizer alone, so every source gets the same
rules):
- byte-level BPE (GPT-2, Llama 3, Qwen, tekken): `Ġthe` -> b" the" through GPT-2's byte<->unicode map.
- SentencePiece: `▁the` -> b" the"; `<0x0A>` -> b"\n" with kind BYTE.
- WordPiece: `##ing` -> b"ing"; a word-start piece gets NO leading space (the decoder inserts spaces between
  words, which no single token owns), so the byte invariant below does not hold for WordPiece.
- specials (control tokens, unknown, unused): b"" with kind SPECIAL, their literal in `special_texts`.

The invariant, tested against each reference implementation: for text x without special-token literals,
`b"".join(token_bytes[i] for i in encode(x))` equals the tokenizer's normalized text as bytes. For byte-level
and tiktoken families that is `x.encode()` (Qwen: NFC of x). For SentencePiece with a dummy prefix it is
`(" " + x).encode()` for non-empty x (also when x already starts with a space: " a" -> "▁▁a"), b"" for "";
models with `remove_extra_whitespaces` first strip and collapse runs of U+0020, exactly as sentencepiece does.
`decode(encode(x)) == x` holds wherever normalization is the identity.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

from transplant.errors import TransplantError
from transplant.tokenizers import family, formats
from transplant.tokenizers.files import OTHER_FILES

log = logging.getLogger(__name__)


class TokenKind(str, Enum):
    NORMAL = "normal"  # a piece of text; its bytes are what it decodes to (leading space included)
    BYTE = "byte"  # a byte-fallback token such as `<0x0A>`; its bytes are that one byte
    SPECIAL = "special"  # control token (bos, eos, chat markers); no bytes in decoded text


@dataclass
class Vocab:
    """A tokenizer plus, for every id, its exact bytes, its kind and (for specials) its role."""

    tokenizer: (
        Any  # transformers.PreTrainedTokenizerFast whose ids equal the family's reference implementation
    )
    token_bytes: list[bytes]  # per id; b"" for specials
    kinds: list[TokenKind]  # per id
    roles: dict[str, int]  # role -> id: "bos", "eos", "pad", "unk", and chat markers ("im_start", ...)
    name: str = ""
    source_format: str = ""  # "hf", "tokenizer.json", "sentencepiece", "tiktoken", "tekken", "gguf"
    adds_prefix_space: bool = False  # SentencePiece dummy prefix: encode("a") starts with the bytes of " a"
    special_texts: dict[int, str] = field(default_factory=dict)  # id -> literal text of a special token
    tokenizer_class: str | None = None  # the family class the source's own files name (LlamaTokenizer, ...)

    def __len__(self) -> int:
        return len(self.token_bytes)

    @cached_property
    def bytes_to_id(self) -> dict[bytes, int]:
        """Normal and byte-fallback tokens by their bytes.

        On duplicates a NORMAL token wins over a byte-fallback one, then the lower id: SentencePiece models
        (Gemma, Mistral) hold both `1` and `<0x31>`, and the byte token is almost never used in training, so
        its row is untrained — matching or segmenting onto it silently ruins every digit.
        """
        table: dict[bytes, int] = {}
        for idx, (piece, kind) in enumerate(zip(self.token_bytes, self.kinds)):
            if kind is TokenKind.SPECIAL:
                continue
            current = table.get(piece)
            if current is None or (self.kinds[current] is TokenKind.BYTE and kind is TokenKind.NORMAL):
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
        """Write tokenizer files that stock `AutoTokenizer` (transformers 4.x and 5.x) loads with the same
        ids.

        Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json. The config names the family
        class of `tokenizer_class` when 4.x and 5.x both load it from tokenizer.json and it loads back with
        the same ids here (`transplant.tokenizers.family`), else PreTrainedTokenizerFast (5.x's own
        `TokenizersBackend` is unknown to 4.x), with the reason logged. Other tokenizer
        files already in `directory` (tokenizer.model, vocab.json, chat_template.jinja, ...) would be stale
        and some are preferred by transformers, so they are removed.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TransplantError(
                f"vocab {self.name!r} has no fast tokenizer to save; load it with load_vocab()"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # what AutoTokenizer reads as named specials
        roles = ("bos", "eos", "unk", "pad", "cls", "sep", "mask")
        special = {f"{role}_token": self._text_of(role) for role in roles}
        special = {key: text for key, text in special.items() if text is not None}
        class_name, why = family.saved_class(self.tokenizer_class)
        config: dict[str, Any] = {
            "tokenizer_class": class_name,
            **special,
            "clean_up_tokenization_spaces": False,
        }
        if class_name != family.GENERIC_CLASS:
            config.update(family.special_flags(backend, self.roles))
        max_len = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(max_len, int) and max_len < 10**12:
            config["model_max_length"] = max_len
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            config["chat_template"] = template
        files = {
            "tokenizer.json": backend.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
        }
        for stale in OTHER_FILES:
            for path in directory.glob(stale):
                log.warning("removing stale tokenizer file %s (it would disagree with tokenizer.json)", path)
                path.unlink()
        _write_files(directory, files)
        if class_name == family.GENERIC_CLASS:
            log.info("tokenizer_config.json names %s: %s", class_name, why)
            return
        failure = family.loads_same(directory, backend)
        if failure is None:
            log.info("tokenizer_config.json names %s (%s)", class_name, why)
            return
        log.warning("tokenizer_config.json names %s instead of %s: %s", family.GENERIC_CLASS,
                    class_name, failure)
        config["tokenizer_class"] = family.GENERIC_CLASS
        for key in ("add_bos_token", "add_eos_token"):
            config.pop(key, None)
        _write_files(directory, {"tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)})

    def _text_of(self, role: str) -> str | None:
        idx = self.roles.get(role)
        return None if idx is None else self.special_texts.get(idx)


def _write_files(directory: Path, files: dict[str, str]) -> None:
    """Each file through a temp file renamed into place."""
    for name, text in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, directory / name)


# Literal special-token names -> role, for tokenizers whose config does not name them (raw files, GGUF).
# roles of the markers that end an assistant turn under a chat template (generation stops there)
TURN_END_ROLES = ("im_end", "eot", "end_turn", "end")

ROLE_NAMES: dict[str, str] = {
    "<s>": "bos",
    "<|begin_of_text|>": "bos",
    "<bos>": "bos",
    "<|startoftext|>": "bos",
    "<|bos|>": "bos",
    "</s>": "eos",
    "<|end_of_text|>": "eos",
    "<eos>": "eos",
    "<|endoftext|>": "eos",
    "<|eos|>": "eos",
    "<pad>": "pad",
    "[pad]": "pad",
    "<|pad|>": "pad",
    "<|finetune_right_pad_id|>": "pad",
    "<unk>": "unk",
    "[unk]": "unk",
    "<|unk|>": "unk",
    "[cls]": "cls",
    "[sep]": "sep",
    "[mask]": "mask",
    "<mask>": "mask",
    "<|im_start|>": "im_start",
    "<|im_end|>": "im_end",
    "<|start_header_id|>": "start_header",
    "<|end_header_id|>": "end_header",
    "<|eot_id|>": "eot",
    "<|eom_id|>": "eom",
    "<|python_tag|>": "python_tag",
    "<|image|>": "image",
    "<start_of_turn>": "start_turn",
    "<end_of_turn>": "end_turn",
    "[inst]": "inst",
    "[/inst]": "/inst",
    "[system_prompt]": "system_prompt",
    "[/system_prompt]": "/system_prompt",
    "[tool_calls]": "tool_calls",
    "[available_tools]": "available_tools",
    "[/available_tools]": "/available_tools",
    "[tool_results]": "tool_results",
    "[/tool_results]": "/tool_results",
    "[tool_content]": "tool_content",
    "[img]": "img",
    "[img_break]": "img_break",
    "[img_end]": "img_end",
    "[prefix]": "fim_prefix",
    "[middle]": "fim_middle",
    "[suffix]": "fim_suffix",
    "<|fim_prefix|>": "fim_prefix",
    "<|fim_middle|>": "fim_middle",
    "<|fim_suffix|>": "fim_suffix",
    "<|fim_pad|>": "fim_pad",
    "<|system|>": "system",
    "<|user|>": "user",
    "<|assistant|>": "assistant",
    "<|end|>": "end",
    "<think>": "think",
    "</think>": "/think",
    "<tool_call>": "tool_call",
    "</tool_call>": "/tool_call",
}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# -------------------------------------------------------------------------------------------- bytes and roles


def _decoder_steps(backend: Any) -> list[dict]:
    if backend.decoder is None:
        return []
    state = json.loads(backend.decoder.__getstate__())
    return state.get("decoders", [state]) if state.get("type") == "Sequence" else [state]


def _family(backend: Any) -> tuple[str, str]:
    """("byte_level" | "sentencepiece" | "wordpiece" | "plain", the family's marker string)."""
    for step in _decoder_steps(backend):
        kind = step.get("type")
        if kind == "ByteLevel":
            return "byte_level", ""
        if kind == "Metaspace":
            return "sentencepiece", step.get("replacement", "▁")
        if kind == "Replace" and step.get("pattern", {}).get("String") == "▁":
            return "sentencepiece", "▁"
        if kind == "WordPiece":
            return "wordpiece", step.get("prefix", "##")
    return "plain", ""


def describe_tokens(backend: Any) -> tuple[list[bytes], list[TokenKind], dict[int, str]]:
    """Per-id bytes and kinds, and the literal text of every special id, for a `tokenizers.Tokenizer`."""
    family, marker = _family(backend)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    pieces: list[str | None] = [None] * size
    for text, idx in vocab.items():
        pieces[idx] = text
    added = backend.get_added_tokens_decoder()
    token_bytes: list[bytes] = [b""] * size
    kinds = [TokenKind.SPECIAL] * size
    special_texts: dict[int, str] = {}
    unk = getattr(backend.model, "unk_token", None)
    for idx, piece in enumerate(pieces):
        if piece is None:
            continue  # an id hole: kept as an empty special so that ids stay positions
        token = added.get(idx)
        if (token is not None and token.special) or piece == unk:
            special_texts[idx] = piece
            continue
        kinds[idx] = TokenKind.NORMAL
        if token is not None:  # a non-special added token is inserted literally
            token_bytes[idx] = (piece.replace(marker, " ") if family == "sentencepiece" else piece).encode()
        elif family == "byte_level":
            try:
                token_bytes[idx] = piece.translate(formats.BYTE_LEVEL_TO_LATIN1).encode("latin-1")
            except UnicodeEncodeError:  # not byte-level text after all: a literal
                token_bytes[idx] = piece.encode()
        elif family == "sentencepiece":
            match = _BYTE_PIECE.match(piece)
            if match:
                token_bytes[idx], kinds[idx] = bytes([int(match.group(1), 16)]), TokenKind.BYTE
            else:
                token_bytes[idx] = piece.replace(marker, " ").encode()
        elif family == "wordpiece":
            token_bytes[idx] = (piece[len(marker) :] if piece.startswith(marker) else piece).encode()
        else:
            token_bytes[idx] = piece.encode()
    holes = pieces.count(None)
    if holes:
        log.warning("tokenizer has %d unused ids; they are kept as empty special tokens", holes)
    return token_bytes, kinds, special_texts


def role_of_text(text: str) -> str | None:
    """The role a special token's literal names (`<|endoftext|>` -> eos), case-insensitively."""
    return ROLE_NAMES.get(text) or ROLE_NAMES.get(text.lower())


def detect_roles(names: dict[str, str], backend: Any, special_texts: dict[int, str]) -> dict[str, int]:
    """Roles from the config's special-token names first, then from the literal names of special tokens."""
    roles: dict[str, int] = {}
    for key, text in names.items():
        idx = backend.token_to_id(text) if text else None
        if key.endswith("_token") and idx is not None:
            roles[key[: -len("_token")]] = idx
    for idx, text in sorted(special_texts.items()):
        role = role_of_text(text)
        if role is not None and role not in roles:
            roles[role] = idx
    return roles


def _adds_prefix_space(backend: Any, token_bytes: list[bytes]) -> bool:
    for probe in ("a", "The", "0"):
        ids = backend.encode(probe, add_special_tokens=False).ids
        if ids:
            return b"".join(token_bytes[i] for i in ids) == b" " + probe.encode()
    return False


def vocab_from_converted(conv: formats.Converted, name: str) -> Vocab:
    """Wrap a converted tokenizer as a `Vocab` (PreTrainedTokenizerFast + bytes, kinds, roles)."""
    from transformers import PreTrainedTokenizerFast

    source = (
        {"tokenizer_file": conv.tokenizer_file}
        if conv.tokenizer is None
        else {"tokenizer_object": conv.tokenizer}
    )
    wrapped = PreTrainedTokenizerFast(**source, clean_up_tokenization_spaces=False)
    backend = wrapped.backend_tokenizer
    names = {k: v for k, v in conv.special_tokens.items() if v and backend.token_to_id(v) is not None}
    wrapped.add_special_tokens(names)
    token_bytes, kinds, special_texts = describe_tokens(backend)
    if conv.chat_template:
        wrapped.chat_template = conv.chat_template
    return Vocab(
        tokenizer=wrapped,
        token_bytes=token_bytes,
        kinds=kinds,
        roles=detect_roles(names, backend, special_texts),
        name=name,
        source_format=conv.source_format,
        adds_prefix_space=_adds_prefix_space(backend, token_bytes),
        special_texts=special_texts,
    )


def rebuilt_vocab(vocab: Vocab, backend: Any, template: str | None) -> Vocab:
    """`vocab` around an edited copy of its backend: roles, template, length limit and family class kept."""
    names = {f"{role}_token": vocab.special_texts[idx] for role, idx in vocab.roles.items()
             if role in ("bos", "eos", "unk", "pad") and idx in vocab.special_texts}
    rebuilt = vocab_from_converted(formats.Converted(backend, names, vocab.source_format,
                                                     template), vocab.name)
    if not template:
        rebuilt.tokenizer.chat_template = None
    max_len = getattr(vocab.tokenizer, "model_max_length", None)
    if isinstance(max_len, int):
        rebuilt.tokenizer.model_max_length = max_len
    rebuilt.tokenizer_class = vocab.tokenizer_class
    return rebuilt
