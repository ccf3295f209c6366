"""The output's README.md: a `huggingface_hub.ModelCard` with metadata the Hub and tools read.

`base_model` links the output to its base on the Hub (model tree, license inheritance), `tags` include
`tokentransplant` so outputs are findable, and the license is carried from the base (its card, its config, or
the offline catalog) because a transplant is a derivative of the base weights.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# The hub repos the offline reference models were quantized from (transplant/assets/catalog.py).
OFFLINE_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "gemma3-270m": "google/gemma-3-270m"}
# The hub repos the offline tokenizer aliases come from, where one repo is clearly theirs.
OFFLINE_TOKENIZER_HUB_IDS = {"mistral-v1": "mistralai/Mistral-7B-v0.1",
                             "mistral-v3": "mistralai/Mistral-7B-Instruct-v0.3",
                             "mistral-tekken-240718": "mistralai/Mistral-Nemo-Instruct-2407",
                             "gpt2": "openai-community/gpt2", "llama3": "meta-llama/Meta-Llama-3-8B"}
# Catalog license names -> the Hub's license identifiers.
HUB_LICENSES = {"apache-2.0": "apache-2.0", "gemma terms of use": "gemma", "mit": "mit"}


def hub_base_model(base: str) -> str | None:
    """The Hub id of the base: itself when it is one, the source repo of an offline alias, else None."""
    from transplant.assets import catalog

    if _HUB_ID.match(base) and not Path(base).exists():
        return base
    if base in catalog.HUB_ALIASES:
        return catalog.HUB_ALIASES[base]
    name = catalog.canonical_model_name(base) if not Path(base).exists() else None
    return OFFLINE_HUB_IDS.get(name or "")


def hub_donor_id(donor: str) -> str | None:
    """The Hub id of the donor: itself, a hub alias's repo, an offline model's or tokenizer's source repo."""
    if Path(donor).exists():
        return None
    return hub_base_model(donor) or OFFLINE_TOKENIZER_HUB_IDS.get(donor.lower())


def pipeline_tag(base_dir: Path | None) -> str | None:
    """`text-generation` for a causal LM base (what the Hub's widget and `pipeline()` need), else None."""
    from transplant.io.model_config import is_causal_lm, load_config

    if base_dir is None or not (base_dir / "config.json").is_file():
        return None
    try:
        return "text-generation" if is_causal_lm(load_config(base_dir)) else None
    except Exception:  # an odd config must not fail the card; the surgery checks the config itself
        return None


def base_license(base: str, base_dir: Path | None) -> str | None:
    """The base's license: its README front matter, then config.json, then the offline catalog."""
    from huggingface_hub import ModelCard

    from transplant.assets import catalog

    if base_dir is not None:
        readme = base_dir / "README.md"
        if readme.is_file():
            try:
                found = ModelCard.load(readme).data.license
                if found:
                    return str(found)
            except Exception as err:  # a malformed card is not worth failing the transplant for
                log.warning("could not read the license from %s: %s", readme, err)
        config = base_dir / "config.json"
        try:
            found = (json.loads(config.read_text(encoding="utf-8")).get("license")
                     if config.is_file() else None)
        except (OSError, ValueError, AttributeError):
            found = None
        if isinstance(found, str) and found:
            return found
    name = catalog.canonical_model_name(base) if not Path(base).exists() else None
    asset = catalog.MODELS.get(name or "")
    if asset is not None and asset.license:
        return HUB_LICENSES.get(asset.license.lower(), "other")
    return None


def model_card(*, base: str, donor: str, method: str, stats: dict[str, Any], options: dict[str, Any],
               base_dir: Path | None = None, chat: dict[str, Any] | None = None) -> str:
    """README.md text: YAML metadata (base_model, tags, license, how it was made) and a short body."""
    from huggingface_hub import ModelCard, ModelCardData

    from transplant.version import __version__

    license_id = base_license(base, base_dir)
    base_id, donor_id = hub_base_model(base), hub_donor_id(donor)
    data = ModelCardData(
        base_model=base_id, base_model_relation="finetune" if base_id else None, license=license_id,
        library_name="transformers", pipeline_tag=pipeline_tag(base_dir),
        tags=["tokentransplant", "tokenizer-transplant", f"tokentransplant-{method}"],
        tokentransplant={"version": __version__, "base": base, "donor": donor, "method": method,
                         **({"base_hub_id": base_id} if base_id else {}),
                         **({"donor_hub_id": donor_id} if donor_id else {}),
                         "options": json.loads(json.dumps(options, default=str)),
                         **({"chat": chat} if chat else {})},
    )
    body = [f"# {Path(base).name} with the {Path(donor).name} tokenizer", "",
            f"Made by tokentransplant {__version__}: the embeddings of `{base_id or base}` were rebuilt for "
            "the tokenizer of "
            f"`{donor_id or donor}` with the `{method}` method; every other weight is unchanged.", ""]
    if license_id is None:
        body += ["License: unknown (the base states none that tokentransplant could read); check the "
                 "base's.", ""]
    if chat:
        body += [f"Chat template: from the {chat['template_source']}."
                 + (f" Control tokens carried from the base with their trained rows: "
                    f"{', '.join(f'`{t}`' for t in chat['carried_control_tokens'])}."
                    if chat.get("carried_control_tokens") else ""), ""]
    body += ["| statistic | value |", "|---|---|"] + [f"| {key} | {value} |" for key, value in stats.items()]
    if options:
        body += ["", "Options: `" + json.dumps(options, sort_keys=True, default=str) + "`"]
    body += ["", "Expect some quality loss until the model is healed (`distill`).", ""]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body))
    return str(card)
