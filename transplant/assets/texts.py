"""Real text for evaluation and training, from Debian packages and the running interpreter, cached.

Bits per byte only compares tokenizers fairly when every model reads the same bytes, so each text has a fixed
split: the **held-out region** is the last `HELDOUT_BYTES` (64 KiB) of the stored text, starting at the first
paragraph or line start inside that window (see `_split`), and the **training region** is everything before
it. `heldout(name, n)` and `train_text(name, n)` return prefixes of those regions that end at a line break, so
training never sees held-out text and the same `n` always gives the same string.

| name | source | what is kept |
|---|---|---|
| english | World English Bible (`sword-text-web`) | verse text, footnotes and headings dropped |
| spanish | Reina-Valera 1909 (`sword-text-sparv`) | same |
| german | German quotations (`fortunes-de`, file `zitate`) | quotes with their attributions, `%` lines
dropped |
| portuguese | Brazilian Portuguese fortunes (`fortunes-br`, file `brasil`) | same (256 KB in all) |
| python-docs | Python 3.11 docs (`python3.11-doc`, info) | from the tutorial on, info menus/headers dropped |
| debian-reference | Debian Reference, English (`debian-reference-en`, plain text) | from chapter 1 on (no
contents) |
| quotes | English quotations (`fortunes`, files in `QUOTE_FILES`) | quotes, `%` lines dropped |
| code | the running interpreter's stdlib | `CODE_MODULES` in order, one header line per file |
| numbers | generated here (seeded) | arithmetic, tables, dates, prices, phone-like numbers |

The Bible modules are read directly from their SWORD zText files (index + zlib blocks), so no `diatheke`
binary or its libraries are needed; only `apt-get download` and `dpkg-deb`. Every text is capped at
`MAX_BYTES`. Debian texts are stable for a given package version (recorded in `<name>.json` next to the text);
`code` depends on the Python version, so its cache file names it.

Sanity numbers (bits per byte on `heldout(name, 8192)`, stock transformers, fp32):
SmolLM2-135M english 0.856, german 1.158, spanish 2.008, code 0.742, python-docs 0.917, numbers 2.021;
Gemma-3-270M english 0.764, german 0.913, spanish 1.346, code 0.733, python-docs 0.912, numbers 1.947.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transplant.cache import cache_dir
from transplant.errors import TransplantError

log = logging.getLogger(__name__)

HELDOUT_BYTES = 64 * 1024
MAX_BYTES = 6 * 1024 * 1024


@dataclass(frozen=True)
class TextAsset:
    name: str
    description: str
    packages: tuple[str, ...]  # Debian packages it is built from (empty: built locally)
    build: Callable[[Path], str]  # root of the extracted packages -> text
    license: str
    min_bytes: int = 4 * HELDOUT_BYTES  # shorter means the source changed (fortunes-br is 3.8 held-out sizes)


# ------------------------------------------------------------------------------------------------ sources

def _debian_packages(packages: tuple[str, ...], dest: Path) -> dict[str, str]:
    """`apt-get download` + `dpkg-deb -x` into `dest`; returns {package: version}."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise TransplantError("the text assets come from Debian packages but apt-get/dpkg-deb are "
                              "missing; run on Debian/Ubuntu, or evaluate on your own files (`transplant "
                              "eval --text FILE`)")
    debs = dest / "debs"
    debs.mkdir(parents=True)
    result = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
    if result.returncode != 0 and "Unable to locate package" in result.stderr and os.geteuid() == 0:
        # A fresh machine has no package lists yet; as root we can fetch them (nothing is installed).
        log.info("apt has no package lists yet; running apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise TransplantError(f"apt-get download {' '.join(packages)} failed ({last}); run `apt-get update` "
                              "(as root) and check the network")
    versions = {}
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        package, version = deb.name.split("_")[:2]
        versions[package] = version.replace("%3a", ":")
    return versions


def _sword_verses(module_dir: Path):
    """Raw OSIS text of every entry of a SWORD zText module, in versification order.

    Layout: <t>.bzv has 10-byte entries (block u32, offset u32, size u16) into the zlib blocks whose
    12-byte entries (offset u32, compressed size u32, size u32) are in <t>.bzs, data in <t>.bzz.
    """
    for testament in ("ot", "nt"):
        index = (module_dir / f"{testament}.bzv").read_bytes()
        blocks_index = (module_dir / f"{testament}.bzs").read_bytes()
        data = (module_dir / f"{testament}.bzz").read_bytes()
        blocks: dict[int, bytes] = {}
        for entry in range(len(index) // 10):
            block, offset, size = struct.unpack_from("<IIH", index, entry * 10)
            if size == 0:
                continue
            if block not in blocks:
                start, length, _ = struct.unpack_from("<III", blocks_index, block * 12)
                blocks[block] = zlib.decompress(data[start:start + length])
            yield blocks[block][offset:offset + size].decode("utf-8")


_NOTE = re.compile(r"<note\b[^>]*(?<!/)>.*?</note>", re.S)
_TITLE = re.compile(r"<title\b[^>]*(?<!/)>.*?</title>", re.S)
_BREAK = re.compile(r"<(?:div\b[^>]*type=\"x-p\"[^>]*|lb\b[^>]*|l\b[^>]*eID[^>]*|/l"
                    r"|chapter\b[^>]*sID[^>]*)/?>")


def _osis_to_text(raw: str) -> str:
    """Plain text from OSIS markup: paragraph/line/chapter marks become line breaks, notes and titles go."""
    text = _TITLE.sub("", _NOTE.sub("\x00", raw))
    text = _BREAK.sub("\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    # A footnote can sit between two words with no space around it ("God<note/>created").
    text = re.sub(r"(?<=\w)\x00+(?=\w)", " ", text).replace("\x00", "")
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line) + "\n"


def _bible(module: str) -> Callable[[Path], str]:
    def build(root: Path) -> str:
        raw = "".join(_sword_verses(root / "usr/share/sword/modules/texts/ztext" / module))
        return _osis_to_text(raw[raw.index("<chapter"):])  # skip the preface before the first chapter

    return build


def _fortunes(raw: str) -> list[str]:
    """The entries of a `fortune` data file (separated by lines holding only `%`)."""
    return [quote.strip("\n") for quote in re.split(r"^%\n", raw, flags=re.M) if quote.strip()]


def _german_quotes(root: Path) -> str:
    """German quotations (fortunes-de `zitate`), one blank line between quotes instead of the `%` lines."""
    raw = (root / "usr/share/games/fortunes/de/zitate").read_text(encoding="utf-8")
    quotes = _fortunes(raw)
    return "\n\n".join(quote.replace("\t\t-- ", "    -- ") for quote in quotes) + "\n"


def _portuguese_quotes(root: Path) -> str:
    """Brazilian Portuguese fortunes (`fortunes-br`): a Romance language for healing mixes, so that a
    multilingual tokenizer's Latin-script word pieces are trained on more than English and German."""
    raw = (root / "usr/share/games/fortunes/brasil").read_text(encoding="utf-8", errors="replace")
    quotes = _fortunes(raw)
    return "\n\n".join(quotes) + "\n"


# English quotation files of the `fortunes` package: prose-like, and in no training corpus of the project.
QUOTE_FILES = ("art", "education", "food", "humorists", "love", "platitudes", "politics", "science",
               "work", "people",
               "wisdom")  # the held-out region is the tail: people and wisdom


def _english_quotes(root: Path) -> str:
    """English quotations: a second English prose source, never trained on (the healing benchmark's
    untrained-source group)."""
    base = root / "usr/share/games/fortunes"
    quotes = []
    for name in QUOTE_FILES:
        raw = (base / name).read_text(encoding="utf-8", errors="replace")
        quotes += _fortunes(raw)
    return "\n\n".join(quote.replace("\t", "    ") for quote in quotes) + "\n"


def _debian_reference(root: Path) -> str:
    """The Debian Reference's English plain-text edition from chapter 1 on: technical documentation that is
    not Python's (the other documentation slice)."""
    import gzip

    text = gzip.decompress((root / "usr/share/debian-reference/debian-reference.en.txt.gz")
                           .read_bytes()).decode()
    text = text.replace("\u00a0", " ")  # the edition writes "Chapter\u00a01." and pads notes with NBSP
    text = text[text.index("\nChapter 1. ") + 1:]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.split("\n")))


def _python_docs(root: Path) -> str:
    import gzip

    text = gzip.decompress((root / "usr/share/info/python3.11.info.gz").read_bytes()).decode()
    text = text[text.rindex("\n", 0, text.index("Node: Whetting Your Appetite")) + 1:]
    keep = []
    for line in text.split("\n"):
        if line.startswith(("File: python3.11.info,", "\x1f", "* Menu:", "Tag Table:", "End Tag Table")):
            continue
        if re.match(r"^\* .*::", line) or "\x7f" in line:
            continue
        keep.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(keep))


# Pure-Python stdlib modules present in CPython 3.10-3.13; the last ones form the held-out region.
CODE_MODULES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py",
    "email/message.py", "fnmatch.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "graphlib.py",
    "heapq.py", "hmac.py", "html/parser.py", "http/cookies.py", "inspect.py", "ipaddress.py",
    "json/decoder.py", "json/encoder.py", "locale.py", "logging/__init__.py", "numbers.py", "operator.py",
    "optparse.py", "pprint.py", "queue.py", "random.py", "sched.py", "secrets.py", "selectors.py", "shlex.py",
    "shutil.py", "socketserver.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py",
    "tempfile.py", "textwrap.py", "threading.py", "timeit.py", "tokenize.py", "trace.py", "traceback.py",
    "types.py", "typing.py", "uuid.py", "warnings.py", "weakref.py", "wave.py", "zipapp.py",
)


def _code(_: Path) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for module in CODE_MODULES:
        path = stdlib / module
        if path.exists():
            parts.append(f"# ===== {module} =====\n{path.read_text(encoding='utf-8')}")
    return "\n".join(parts)


def _numbers(_: Path) -> str:
    """Seeded synthetic text of numbers in many formats (random.Random's integer API is stable across
    versions)."""
    import random

    rng = random.Random(20261124)
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    items = ["widget", "bolt", "cable", "lamp", "chair", "paper", "filter", "battery", "valve", "sensor"]

    def money(cents: int) -> str:
        return f"{cents // 100}.{cents % 100:02d}"

    def line() -> str:
        kind = rng.randrange(10)
        a, b = rng.randrange(1, 10_000), rng.randrange(1, 1_000)
        if kind == 0:
            op = rng.choice("+-×")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            return f"{a} {op} {b} = {value}"
        if kind == 1:
            return f"{a} / {b} = {a // b} remainder {a % b}"
        if kind == 2:
            n = rng.randrange(2, 20)
            return "  ".join(f"{n}×{k}={n * k}" for k in range(1, 11))
        year, month, day = rng.randrange(1900, 2100), rng.randrange(1, 13), rng.randrange(1, 29)
        if kind == 3:
            return (f"{year}-{month:02d}-{day:02d}, {day:02d}.{month:02d}.{year}, {months[month - 1]} "
                    f"{day}, {year}, "
                    f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}")
        if kind == 4:
            cents = rng.randrange(1, 500_000)
            return (f"price ${money(cents)}, €{money(cents * 92 // 100).replace('.', ',')}, "
                    f"£{money(cents * 79 // 100)}")
        if kind == 5:
            return (f"+1 ({rng.randrange(200, 1000)}) "
                    f"{rng.randrange(100, 1000)}-{rng.randrange(10_000):04d}, "
                    f"+49 {rng.randrange(30, 90)} {rng.randrange(1_000_000, 10_000_000)}")
        if kind == 6:
            rows = ["item,qty,unit_price,total"]
            for _ in range(rng.randrange(2, 6)):
                qty, cents = rng.randrange(1, 100), rng.randrange(5, 10_000)
                rows.append(f"{rng.choice(items)},{qty},{money(cents)},{money(qty * cents)}")
            return "\n".join(rows)
        if kind == 7:
            big = rng.randrange(1_000, 10**10)
            return (f"{big:,} ({big}) = {big / 1e6:.3f} million; "
                    f"{rng.randrange(1, 100)}.{rng.randrange(100):02d}%")
        if kind == 8:
            return (f"v{rng.randrange(10)}.{rng.randrange(30)}.{rng.randrange(100)}, 0x{a * b:x}, "
                    f"{a}e{rng.randrange(-9, 10)}")
        return " ".join(str(rng.randrange(10 ** rng.randrange(1, 8))) for _ in range(rng.randrange(3, 12)))

    lines, size = [], 0
    while size < 2 * 1024 * 1024 + HELDOUT_BYTES:
        entry = line()
        lines.append(entry)
        size += len(entry.encode()) + 1
    return "\n".join(lines) + "\n"


TEXTS: dict[str, TextAsset] = {
    t.name: t
    for t in [
        TextAsset("english", "World English Bible (sword-text-web), plain verse text", ("sword-text-web",),
                  _bible("engWEB2015eb"), "public domain"),
        TextAsset("spanish", "Reina-Valera 1909 (sword-text-sparv), plain verse text", ("sword-text-sparv",),
                  _bible("spaRV1909eb"), "public domain"),
        TextAsset("german", "German quotations (fortunes-de, `zitate`)", ("fortunes-de",), _german_quotes,
                  "see /usr/share/doc/fortunes-de/copyright"),
        TextAsset("portuguese", "Brazilian Portuguese fortunes (fortunes-br, `brasil`)", ("fortunes-br",),
                  _portuguese_quotes, "GPL-2+ (see /usr/share/doc/fortunes-br/copyright)",
                  min_bytes=3 * HELDOUT_BYTES),
        TextAsset("python-docs", "Python 3.11 documentation, tutorial onwards (python3.11-doc, info)",
                  ("python3.11-doc",), _python_docs, "PSF"),
        TextAsset("debian-reference", "Debian Reference, English plain text (debian-reference-en)",
                  ("debian-reference-en",), _debian_reference, "GPL-2+"),
        TextAsset("quotes", "English quotations (fortunes: literature, wisdom, people, ...)", ("fortunes",),
                  _english_quotes, "see /usr/share/doc/fortunes/copyright"),
        TextAsset("code", "Python stdlib source of the running interpreter (fixed module list)", (),
                  _code, "PSF"),
        TextAsset("numbers", "generated (seeded): arithmetic, tables, dates, prices, phone-like numbers", (),
                  _numbers, "generated"),
    ]
}


# -------------------------------------------------------------------------------------------- cache + API

def _asset(name: str) -> TextAsset:
    try:
        return TEXTS[name]
    except KeyError as err:
        raise TransplantError(f"unknown text {name!r}; known: {', '.join(TEXTS)}") from err


def text_path(name: str) -> Path:
    """Where the text is cached (`code` is per Python version, since it is read from the interpreter)."""
    suffix = f"-py{sys.version_info[0]}.{sys.version_info[1]}" if name == "code" else ""
    return cache_dir() / "texts" / f"{_asset(name).name}{suffix}.txt"


def is_cached(name: str) -> bool:
    return text_path(name).exists()


def _cap(text: str) -> str:
    data = text.encode("utf-8")
    if len(data) <= MAX_BYTES:
        return text
    return data[:MAX_BYTES].decode("utf-8", errors="ignore").rsplit("\n", 1)[0] + "\n"


def fetch_text(name: str) -> Path:
    """The cached text file for `name`, built on first use (Debian downloads take a few seconds)."""
    asset, dest = _asset(name), text_path(name)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=dest.parent))
    try:
        versions = _debian_packages(asset.packages, work / "root") if asset.packages else {}
        log.info("building text %r from %s", name, ", ".join(asset.packages) or "local sources")
        content = _cap(asset.build(work / "root"))
        if len(content.encode("utf-8")) < asset.min_bytes:
            raise RuntimeError(f"text {name!r} came out too short ({len(content)} chars); the source changed")
        tmp = work / dest.name
        tmp.write_text(content, encoding="utf-8")
        meta = {"name": name, "packages": versions, "bytes": len(content.encode("utf-8")),
                "license": asset.license, "python": sys.version.split()[0] if name == "code" else None}
        dest.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def text(name: str) -> str:
    """The whole stored text (training region followed by the held-out region)."""
    return fetch_text(name).read_text(encoding="utf-8")


def _split(content: str) -> int:
    """Character index where the held-out region starts: the first paragraph start (blank line) in the first
    8 KiB of the last HELDOUT_BYTES, else the first line start there."""
    data = content.encode("utf-8")
    window_start = max(0, len(data) - HELDOUT_BYTES)
    paragraph = data.find(b"\n\n", window_start, window_start + 8192)
    start = paragraph + 2 if paragraph >= 0 else data.find(b"\n", window_start) + 1
    return len(data[:start].decode("utf-8"))


def _prefix(region: str, n_bytes: int) -> str:
    """Longest prefix of `region` with at most n_bytes UTF-8 bytes that ends at a line break (else a
    character)."""
    data = region.encode("utf-8")
    if len(data) <= n_bytes:
        return region
    cut = data[:n_bytes]
    end = cut.rfind(b"\n")
    return (cut[:end + 1] if end >= 0 else cut).decode("utf-8", errors="ignore")


def heldout(name: str, n_bytes: int = 16384) -> str:
    """The first ~n_bytes of the held-out region (never in `train_text`); at most HELDOUT_BYTES."""
    if n_bytes > HELDOUT_BYTES:
        raise TransplantError(f"held-out slices are at most {HELDOUT_BYTES} bytes, got "
                              f"{n_bytes}; ask for less")
    content = text(name)
    return _prefix(content[_split(content):], n_bytes)


def train_text(name: str, n_bytes: int = 1024 * 1024) -> str:
    """The first ~n_bytes of the training region (the whole region if it is shorter)."""
    content = text(name)
    return _prefix(content[:_split(content)], n_bytes)
