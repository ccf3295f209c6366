"""A model folder's tokenizer as llama.cpp's GGUF vocabulary metadata (`tokenizer.ggml.*`).

llama.cpp knows two BPE families, and a transplanted model has one of them:

* `gpt2`: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2, tekken). Tokens as stored (`Ġthe`), the merge list,
  and `tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp must apply. That name is found by
  splitting a check text with the model's pre-tokenizer and with reference pre-tokenizers for the names
  llama.cpp knows (`PRE_TOKENIZERS`); an unknown one is written as `default` with a warning.
* `llama`: SentencePiece-style BPE (Mistral, Llama 2, Gemma), with byte fallback. Tokens with `▁`, and scores:
  llama.cpp merges the adjacent pair whose concatenation has the highest score, and our tokenizer.json holds
  the same order as a merge list (`transplant.tokenizers.formats`), so a piece's score is minus the rank of
  the first merge that makes it.

Token types decide what llama.cpp may produce from text and what it prints: special added tokens (`<s>`,
`[INST]`, `<|im_start|>`, a `--special` token) are CONTROL, other added tokens USER_DEFINED (CONTROL when they
look like control tokens, as llama.cpp's own converter does), `<0xNN>` byte-fallback pieces BYTE, the unknown
token UNKNOWN, padded ids UNUSED (`[PADn]`, one per embedding row beyond the tokenizer: llama.cpp needs one
token per row). Other tokenizer models (WordPiece, Unigram) are refused with one line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# llama.cpp's check text for pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre)
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


@dataclass
class GGUFVocab:
    """Everything `write_vocab` puts under `tokenizer.*`."""

    model: str  # "gpt2" | "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | None = None


def _reference_pre_tokenizers() -> dict[str, object]:
    from tokenizers import Regex, pre_tokenizers

    from transplant.tokenizers.formats import PATTERNS

    def split(pattern: str):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        "llama-bpe": split(PATTERNS["llama3"]),
        "qwen2": split(PATTERNS["qwen"]),
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    }


def pre_tokenizer_name(backend) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer of `backend` (module docstring), else "default"."""
    if backend.pre_tokenizer is None:
        return "default"
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(CHECK_TEXT)]
    for name, reference in _reference_pre_tokenizers().items():
        if [piece for piece, _ in reference.pre_tokenize_str(CHECK_TEXT)] == pieces:
            return name
    log.warning("the tokenizer's pre-tokenizer is none llama.cpp knows by name; writing "
                "tokenizer.ggml.pre=default, so llama.cpp may split text differently than transformers")
    return "default"


def looks_like_control(text: str) -> bool:
    """llama.cpp's converter makes these CONTROL even when a tokenizer forgot to mark them special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _family(data: dict) -> str:
    """"gpt2" (byte-level) or "llama" (SentencePiece-style) from tokenizer.json, or a one-line refusal."""
    model_type = data.get("model", {}).get("type")
    decoder = json.dumps(data.get("decoder"), ensure_ascii=False)
    if model_type == "BPE" and "ByteLevel" in decoder:
        return "gpt2"
    steps = decoder + json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    if model_type == "BPE" and "\u2581" in steps:
        return "llama"
    raise TransplantError("GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this "
                          "one is "
                          f"{model_type or 'unknown'} with decoder {decoder[:60]}; export it with "
                          "llama.cpp's converter")


def _merge_strings(merges: list) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else str(m) for m in merges]


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores from the merge order: minus the rank of the first merge making each
    piece."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        first.setdefault(left + right, rank)
    unmerged = -float(len(merges) + 1)  # pieces no merge makes (single characters, bytes, specials)
    return [-float(first[t]) if t in first else unmerged for t in tokens]


def _token_types(tokens: list[str], added: dict[int, object], unk: str | None, family: str,
                 byte_fallback: bool, known: int) -> list[int]:
    types = []
    for idx, text in enumerate(tokens):
        token = added.get(idx)
        if idx >= known:
            types.append(UNUSED)
        elif text == unk and family == "llama":  # byte-level models never produce it; their unk is often eos
            types.append(UNKNOWN)
        elif token is not None and getattr(token, "special", False):
            types.append(CONTROL)
        elif token is not None:
            types.append(CONTROL if looks_like_control(text) else USER_DEFINED)
        elif family == "llama" and byte_fallback and _BYTE_PIECE.match(text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    extra = full[: len(full) - len(plain)] if first else full[len(plain):]
    return len(full) > len(plain) and token_id in extra


def describe_vocab(model_dir: Path, rows: int, config: dict | None = None) -> GGUFVocab:
    """The GGUF vocabulary of the tokenizer in `model_dir`, with one token per embedding row (`rows`)."""
    from transplant.tokenizers.load import load_vocab

    vocab = load_vocab(model_dir)
    backend = vocab.tokenizer.backend_tokenizer
    data = json.loads(backend.to_str())
    family = _family(data)
    table = backend.get_vocab(with_added_tokens=True)
    known = max(table.values(), default=-1) + 1
    if known > rows:
        raise TransplantError(f"{model_dir}: the tokenizer has {known} ids but the embeddings {rows} rows; "
                              "the model and tokenizer do not belong together")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    for text, idx in table.items():
        tokens[idx] = text
    added = backend.get_added_tokens_decoder()
    model = data["model"]
    types = _token_types(tokens, added, model.get("unk_token"), family,
                         bool(model.get("byte_fallback")), known)
    # llama.cpp matches user-defined pieces in the raw text, where spaces are still spaces
    if family == "llama":
        tokens = [t.replace("\u2581", " ") if k == USER_DEFINED else t for t, k in zip(tokens, types)]
    merges = _merge_strings(model.get("merges", []))
    special_ids = {role: idx for role, idx in vocab.roles.items() if role in ("bos", "eos", "unk", "pad")}
    if "eos" not in special_ids and config is not None:
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and 0 <= eos < rows:
            special_ids["eos"] = eos
    result = GGUFVocab(model=family, tokens=tokens, types=types, special_ids=special_ids,
                       add_bos=_adds(vocab.tokenizer, special_ids.get("bos"), True),
                       add_eos=_adds(vocab.tokenizer, special_ids.get("eos"), False),
                       chat_template=getattr(vocab.tokenizer, "chat_template", None) or None)
    if family == "gpt2":
        result.merges, result.pre = merges, pre_tokenizer_name(backend)
    else:
        result.scores = _scores(tokens, merges)
        result.add_space_prefix = vocab.adds_prefix_space
        result.remove_extra_whitespaces = " {2,}" in json.dumps(data.get("normalizer"))
    return result


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add `vocab` to a `gguf.GGUFWriter` under llama.cpp's `tokenizer.ggml.*` keys."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for role, idx in vocab.special_ids.items():
        adders[role](idx)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
