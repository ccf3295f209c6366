"""load_vocab / Vocab on tiny tokenizers built in the test: bytes, kinds, roles, ids vs references, bad
inputs."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import BASE_CORPUS, DONOR_CORPUS, build_byte_bpe
from transplant.assets import catalog, load_vocab
from transplant.errors import TransplantError
from transplant.tokenizers.vocab import TokenKind, Vocab

SAMPLE = (Path(__file__).parent / "data" / "multilingual_sample.txt").read_text(encoding="utf-8")
EDGE = [
    "",
    " ",
    "  ",
    " a",
    "a ",
    "  two leading",
    "two trailing  ",
    "\n\n\n",
    "\t",
    "a\tb",
    "🙂",
    "👨‍👩‍👧‍👦",
    "ü",
    "日本語",
    "12345678901234567890",
    "x  y   z",
    " \n ",
    "a \nb",
    "a\n  b",
    "a\r\nb",
    "<tool> call",
    "ok<tool>",
]
TEXTS = [SAMPLE, *EDGE, *SAMPLE.splitlines()[:60]]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))


def expected_bytes(vocab: Vocab, text: str) -> bytes:
    """The normalized text a tokenizer without normalization rules covers: the dummy prefix is a real
    space."""
    return (" " + text).encode() if vocab.adds_prefix_space and text else text.encode()


def assert_byte_invariant(vocab: Vocab, texts: list[str]) -> None:
    for text in texts:
        ids = vocab.encode(text)
        assert b"".join(vocab.token_bytes[i] for i in ids) == expected_bytes(vocab, text), text
        assert vocab.decode(ids) == text, text


# ---------------------------------------------------------------------------------------------- SentencePiece


def train_sentencepiece(directory: Path, name: str, **extra) -> Path:
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text(SAMPLE + BASE_CORPUS + DONOR_CORPUS, encoding="utf-8")
    options = dict(
        input=str(corpus),
        model_prefix=str(directory / name),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        hard_vocab_limit=False,
        num_threads=1,
        user_defined_symbols=["<tool>"],
        control_symbols=["[INST]", "[/INST]"],
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=100000,
    )
    options.update(extra)
    spm.SentencePieceTrainer.train(**options)
    return directory / f"{name}.model"


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    plain = train_sentencepiece(root, "plain")
    renamed = root / "tokenizer.model.v3"  # Mistral-style name: detected by content, not suffix
    renamed.write_bytes(plain.read_bytes())
    nfkc = train_sentencepiece(
        root, "nfkc", normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True
    )
    collapse = train_sentencepiece(root, "collapse", remove_extra_whitespaces=True)  # identity + collapse
    unigram = train_sentencepiece(root, "unigram", model_type="unigram", vocab_size=1200)
    return {"plain": plain, "renamed": renamed, "nfkc": nfkc, "collapse": collapse, "unigram": unigram}


@pytest.mark.parametrize("which", ["plain", "renamed", "nfkc", "collapse", "unigram"])
def test_sentencepiece_ids_match_reference(sp_models, which):
    import sentencepiece as spm

    path = sp_models[which]
    reference = spm.SentencePieceProcessor(model_file=str(path))
    vocab = load_vocab(path)
    assert vocab.source_format == "sentencepiece" and len(vocab) == reference.get_piece_size()
    for text in TEXTS:
        assert vocab.encode(text) == reference.encode(text), text
    assert vocab.encode("hi", add_special_tokens=True)[0] == reference.bos_id()


def test_sentencepiece_bytes_kinds_roles(sp_models):
    import sentencepiece as spm

    vocab = load_vocab(sp_models["plain"])
    reference = spm.SentencePieceProcessor(model_file=str(sp_models["plain"]))
    assert vocab.adds_prefix_space
    newline = reference.piece_to_id("<0x0A>")
    assert vocab.token_bytes[newline] == b"\n" and vocab.kinds[newline] is TokenKind.BYTE
    assert sum(kind is TokenKind.BYTE for kind in vocab.kinds) == 256
    word = next(
        i
        for i in range(len(vocab))
        if reference.id_to_piece(i).startswith("▁") and len(reference.id_to_piece(i)) > 2
    )
    assert vocab.token_bytes[word] == reference.id_to_piece(word).replace("▁", " ").encode()
    assert vocab.roles["unk"] == reference.unk_id() and vocab.roles["bos"] == reference.bos_id()
    assert vocab.roles["eos"] == reference.eos_id()
    inst = reference.piece_to_id("[INST]")
    assert vocab.roles["inst"] == inst and vocab.roles["/inst"] == reference.piece_to_id("[/INST]")
    assert vocab.kinds[inst] is TokenKind.SPECIAL and vocab.token_bytes[inst] == b""
    assert vocab.special_texts[inst] == "[INST]"
    tool = reference.piece_to_id("<tool>")  # user-defined: real text, matched whole
    assert vocab.kinds[tool] is TokenKind.NORMAL and vocab.token_bytes[tool] == b"<tool>"
    assert tool in vocab.encode("use <tool> now")
    assert_byte_invariant(vocab, TEXTS)


def test_sentencepiece_remove_extra_whitespaces(sp_models):
    vocab = load_vocab(sp_models["nfkc"])
    ids = vocab.encode("  a   b  ")
    assert (
        b"".join(vocab.token_bytes[i] for i in ids) == b" a b"
    )  # stripped and collapsed, like sentencepiece


def test_dir_with_only_tokenizer_model_uses_our_converter(tmp_path, sp_models):
    import sentencepiece as spm

    directory = tmp_path / "spdir"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(sp_models["plain"].read_bytes())
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "chat_template": "{{ 'x' }}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    vocab = load_vocab(directory)
    reference = spm.SentencePieceProcessor(model_file=str(sp_models["plain"]))
    assert vocab.source_format == "sentencepiece" and vocab.tokenizer.chat_template == "{{ 'x' }}"
    assert vocab.roles["pad"] == reference.unk_id()  # the config's names win over the model's
    assert all(vocab.encode(text) == reference.encode(text) for text in TEXTS)
    # with a tokenizer.json next to it, that file is used (as transformers does), whatever it says
    build_byte_bpe(tmp_path / "bpe", BASE_CORPUS, 300, ["<s>", "</s>", "<pad>"])
    shutil.copy(tmp_path / "bpe" / "tokenizer.json", directory / "tokenizer.json")
    assert load_vocab(directory).source_format == "hf"


# ---------------------------------------------------------------------------------------- byte-level / HF dir


def test_hf_dir_byte_level(tmp_path):
    directory = build_byte_bpe(tmp_path / "tok", BASE_CORPUS + DONOR_CORPUS, 500, ["<s>", "</s>", "<pad>"])
    vocab = load_vocab(directory)
    assert vocab.source_format == "hf" and not vocab.adds_prefix_space
    assert vocab.roles == {"bos": 0, "eos": 1, "pad": 2}
    assert all(vocab.kinds[i] is TokenKind.SPECIAL and vocab.token_bytes[i] == b"" for i in range(3))
    backend = vocab.tokenizer.backend_tokenizer
    the = backend.token_to_id("Ġthe")
    assert vocab.token_bytes[the] == b" the" and vocab.kinds[the] is TokenKind.NORMAL
    newline = backend.token_to_id("Ċ")
    assert vocab.token_bytes[newline] == b"\n"
    assert len(vocab.bytes_to_id) == len(vocab) - 3  # every normal token has distinct bytes
    assert_byte_invariant(vocab, TEXTS)


def test_save_round_trip_through_auto_tokenizer(tmp_path, sp_models):
    from transformers import AutoTokenizer

    for source in (
        sp_models["plain"],
        build_byte_bpe(tmp_path / "bpe", BASE_CORPUS, 400, ["<s>", "</s>", "<pad>", "<mask>"]),
    ):
        vocab = load_vocab(source)
        out = tmp_path / f"saved-{Path(source).name}"
        out.mkdir()
        (out / "tokenizer.model").write_bytes(b"stale")  # would shadow tokenizer.json for some classes
        (out / "chat_template.jinja").write_text("stale")
        vocab.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        vocab.save(out)
        assert not (out / "tokenizer.model").exists() and not (out / "chat_template.jinja").exists()
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config
        loaded = AutoTokenizer.from_pretrained(out)
        for text in TEXTS:
            assert loaded.encode(text, add_special_tokens=False) == vocab.encode(text), text
        assert loaded.encode("hi") == vocab.encode("hi", add_special_tokens=True)
        assert loaded.bos_token == vocab.special_texts[vocab.roles["bos"]]
        if source != sp_models["plain"]:  # an MLM mask token stays a named special
            assert loaded.mask_token == "<mask>" and config["mask_token"] == "<mask>"
        assert loaded.chat_template == vocab.tokenizer.chat_template
        again = load_vocab(out)
        assert (again.token_bytes, again.kinds, again.roles) == (vocab.token_bytes, vocab.kinds, vocab.roles)
        assert again.adds_prefix_space == vocab.adds_prefix_space


def test_wordpiece_bytes_and_roles(tmp_path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "hello",
        "world",
        "##lo",
        "##ld",
        "wor",
        "hel",
        "!",
    ]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save(str(tmp_path / "tokenizer.json"))
    vocab = load_vocab(tmp_path / "tokenizer.json")
    assert vocab.source_format == "tokenizer.json"
    assert (
        vocab.token_bytes[words.index("##lo")] == b"lo"
        and vocab.token_bytes[words.index("hello")] == b"hello"
    )
    assert vocab.roles == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert vocab.encode("hello world!") == [5, 6, 11]


# ------------------------------------------------------------------------------------------ tiktoken / tekken


def tiny_ranks() -> dict[bytes, int]:
    """All 256 bytes plus merges learned greedily from the corpus (enough to exercise multi-byte tokens)."""
    from collections import Counter

    ranks = {bytes([b]): b for b in range(256)}
    words = [list(w.encode()) for w in (BASE_CORPUS + DONOR_CORPUS).split(" ")]
    words = [[bytes([b]) for b in w] for w in words]
    for _ in range(150):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (left, right), _ = pairs.most_common(1)[0]
        ranks.setdefault(left + right, len(ranks))
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == left and w[i + 1] == right:
                    out.append(left + right)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = [
        f"{base64.b64encode(tok).decode()} {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tiktoken_file_matches_tiktoken(tmp_path):
    import tiktoken

    from transplant.tokenizers.formats import PATTERNS

    ranks = tiny_ranks()
    path = write_tiktoken(tmp_path / "tiny.tiktoken", ranks)
    reference = tiktoken.Encoding(
        "tiny", pat_str=PATTERNS["llama3"], mergeable_ranks=ranks, special_tokens={}
    )
    vocab = load_vocab(path)  # no options: Llama-3 pattern, no specials
    assert vocab.source_format == "tiktoken" and len(vocab) == len(ranks) and not vocab.roles
    for text in TEXTS:
        assert vocab.encode(text) == reference.encode_ordinary(text), text
    assert all(vocab.token_bytes[rank] == tok for tok, rank in ranks.items())
    assert_byte_invariant(vocab, TEXTS)
    gpt2 = load_vocab(path, options={"pattern": "gpt2", "specials": ["<|endoftext|>", "<|im_start|>"]})
    assert gpt2.roles == {"eos": len(ranks), "im_start": len(ranks) + 1}
    assert gpt2.kinds[len(ranks)] is TokenKind.SPECIAL and gpt2.special_texts[len(ranks)] == "<|endoftext|>"
    reference2 = tiktoken.Encoding(
        "tiny2", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks, special_tokens={}
    )
    assert gpt2.encode(SAMPLE) == reference2.encode_ordinary(SAMPLE)


def test_tekken_json(tmp_path):
    import tiktoken

    ranks = tiny_ranks()
    pattern = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    entries = [
        {"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": None}
        for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    num_special = 30
    data = {
        "config": {
            "pattern": pattern,
            "num_vocab_tokens": len(entries),
            "version": "v3",
            "default_vocab_size": num_special + len(entries) - 10,
            "default_num_special_tokens": num_special,
        },
        "vocab": entries,
    }
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    kept = {t: r for t, r in ranks.items() if r < len(entries) - 10}
    reference = tiktoken.Encoding("t", pat_str=pattern, mergeable_ranks=kept, special_tokens={})
    vocab = load_vocab(path)
    assert vocab.source_format == "tekken" and len(vocab) == num_special + len(kept)
    assert vocab.roles["unk"] == 0 and vocab.roles["bos"] == 1 and vocab.roles["eos"] == 2
    assert vocab.roles["inst"] == 3 and vocab.roles["pad"] == 11
    assert vocab.special_texts[num_special - 1] == f"<SPECIAL_{num_special - 1}>"
    for text in TEXTS:
        assert vocab.encode(text) == [i + num_special for i in reference.encode_ordinary(text)], text
    assert vocab.encode("a", add_special_tokens=True)[0] == 1
    assert_byte_invariant(vocab, TEXTS)


# ------------------------------------------------------------------------------------------------------- GGUF


def test_gguf_llama_spm_vocab_matches_sentencepiece(tmp_path, sp_models):
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_models["plain"].read_bytes())
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])
    writer.add_bos_token_id(proto.trainer_spec.bos_id)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vocab = load_vocab(tmp_path / "tiny.gguf")
    reference = spm.SentencePieceProcessor(model_file=str(sp_models["plain"]))
    assert vocab.source_format == "gguf" and vocab.adds_prefix_space
    for text in TEXTS:
        assert vocab.encode(text) == reference.encode(text), text
    assert vocab.tokenizer.chat_template == "{{ messages[0]['content'] }}"
    assert vocab.roles["bos"] == reference.bos_id()


# ---------------------------------------------------------------------------------------- dispatch and errors


def test_cache_is_reused_and_repaired(tmp_path, sp_models):
    from transplant.assets.wheels import cache_dir

    first = load_vocab(sp_models["plain"])
    entries = list((cache_dir() / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").exists()
    (entries[0] / "tokenizer.json").write_text("{broken")
    again = load_vocab(sp_models["plain"])  # a damaged entry is rebuilt, not trusted
    assert again.encode(SAMPLE) == first.encode(SAMPLE)


def test_resolve_model_hook(tmp_path, monkeypatch):
    directory = build_byte_bpe(tmp_path / "model", BASE_CORPUS, 300, ["<s>", "</s>", "<pad>"])
    monkeypatch.setattr(
        catalog, "resolve_model", lambda spec: directory if spec == "tiny-model" else spec, raising=False
    )
    assert load_vocab("tiny-model").roles["bos"] == 0


def one_line_error(spec) -> str:
    with pytest.raises(TransplantError) as info:
        load_vocab(spec)
    message = str(info.value)
    assert "\n" not in message and ";" in message  # problem; fix
    return message


def test_bad_inputs_raise_transplant_error(tmp_path, sp_models):
    assert "does not exist" in one_line_error(tmp_path / "missing" / "tokenizer.json")
    assert "does not exist" in one_line_error("./no/such/tokenizer.model")
    (tmp_path / "notes.txt").write_text("just some words, not a tokenizer\n" * 10)
    assert "unknown tokenizer format" in one_line_error(tmp_path / "notes.txt")
    (tmp_path / "broken.model").write_bytes(sp_models["plain"].read_bytes()[:5000])
    assert "broken.model" in one_line_error(tmp_path / "broken.model")
    (tmp_path / "bad.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    assert "not a valid tokenizer.json" in one_line_error(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text('{"model": {"type": "BPE", "vo')
    assert "not valid JSON" in one_line_error(tmp_path / "cut.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert "neither" in one_line_error(tmp_path / "other.json")
    (tmp_path / "bad.tiktoken").write_text("IQ== 0\nIg== 1\nnot-base64 x\n")
    assert "tiktoken" in one_line_error(tmp_path / "bad.tiktoken")
    (tmp_path / "empty").mkdir()
    assert "no tokenizer files" in one_line_error(tmp_path / "empty")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    assert "GGUF" in one_line_error(tmp_path / "bad.gguf")
    assert "cannot load tokenizer" in one_line_error("nobody/no-such-model-xyz")
