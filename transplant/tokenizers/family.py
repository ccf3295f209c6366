"""Which `tokenizer_class` a saved tokenizer_config.json names.

Tools that branch on the class (mergekit, for one) misread a Llama-family tokenizer saved as
`PreTrainedTokenizerFast`, so the donor's family class is kept when it is safe: the class must exist as a
fast (tokenizer.json-reading) tokenizer in transformers 4.x (`LlamaTokenizerFast`, picked by AutoTokenizer
from `LlamaTokenizer`) and 5.x (`LlamaTokenizer`, tokenizers-backed), and the saved folder must give the same
ids when loaded back. Anything else is saved as `PreTrainedTokenizerFast`, which both versions load verbatim.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENERIC_CLASS = "PreTrainedTokenizerFast"

# Family classes that transformers 4.x has as `<name>Fast` (reading tokenizer.json) and 5.x as `<name>`.
# Classes whose fast init rebuilds the pipeline from options (T5, Bert: normalizer/lower-casing) are left out.
FAMILY_FAST_CLASSES = frozenset({
    "LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer", "GPT2Tokenizer", "Qwen2Tokenizer",
    "GPTNeoXTokenizer", "BloomTokenizer", "CohereTokenizer",
})

PROBE_TEXT = "Hello world! The café costs 12.50 €.\n    def f(x):\n        return x**2  # 𝛑"


def read_family_class(spec: str | Path | None) -> str | None:
    """The `tokenizer_class` a tokenizer dir's own tokenizer_config.json names, `Fast` suffix removed."""
    if spec is None:
        return None
    path = Path(str(spec))
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name:
        return None
    return name[: -len("Fast")] if name.endswith("Fast") else name


def saved_class(family: str | None) -> tuple[str, str]:
    """(class to write, why) for a donor whose files name `family` (None: they name none)."""
    if not family or family in (GENERIC_CLASS, "PreTrainedTokenizer", "TokenizersBackend"):
        return GENERIC_CLASS, "the donor's files name no family tokenizer class"
    if family not in FAMILY_FAST_CLASSES:
        return GENERIC_CLASS, (f"the donor's class {family} is not a fast family class that "
                               "transformers 4.x and 5.x both load from tokenizer.json")
    return family, f"the donor's own family class {family}"


def special_flags(backend: Any, roles: dict[str, int]) -> dict[str, bool]:
    """`add_bos_token`/`add_eos_token` as the saved tokenizer.json behaves: family classes (Llama, Gemma)
    rebuild their post-processor from these flags on load, so they must say what tokenizer.json already
    does."""
    ids = backend.encode("a", add_special_tokens=True).ids
    return {"add_bos_token": bool(ids) and ids[0] == roles.get("bos"),
            "add_eos_token": len(ids) > 1 and ids[-1] == roles.get("eos")}


def loads_same(directory: Path, backend: Any) -> str | None:
    """None when AutoTokenizer on `directory` gives the backend's ids on a probe text, else why not."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # any failure to load means the class is not usable here
        return (f"AutoTokenizer could not load it ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})")
    for specials in (False, True):
        want = backend.encode(PROBE_TEXT, add_special_tokens=specials).ids
        got = list(loaded(PROBE_TEXT, add_special_tokens=specials)["input_ids"])
        if got != want:
            return f"AutoTokenizer with that class gives other ids (add_special_tokens={specials})"
    return None
