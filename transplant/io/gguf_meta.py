"""GGUF metadata that says where a model came from and where a chat turn ends (`export-gguf`).

llama.cpp and the hubs that index GGUFs read `general.*` for the model's name, its base models, license and
tags; without them a GGUF is known by its file name only. The end-of-turn token is written explicitly
(`tokenizer.ggml.eot_token_id`): llama.cpp otherwise guesses it from a list of known texts, which misses a
marker added with `extend --special` and can pick the donor's `</s>` over the template's `<|im_end|>`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# End-of-turn (and end-of-message) markers of the chat templates in use, most specific first.
EOT_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
EOM_TEXTS = ("<|eom_id|>",)


@dataclass
class Provenance:
    """What the output's model card says about it (empty fields where it says nothing)."""

    name: str
    base_models: list[str] = field(default_factory=list)  # hub ids
    license: str | None = None
    tags: list[str] = field(default_factory=list)


def read_provenance(model_dir: Path) -> Provenance:
    """Name, base models, license and tags from `model_dir/README.md`'s metadata (a tokentransplant card or
    any Hub card); the folder name when there is no card."""
    from huggingface_hub import ModelCard

    readme = Path(model_dir) / "README.md"
    if not readme.is_file():
        return Provenance(Path(model_dir).name)
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception as err:  # a malformed card must not stop an export
        log.warning("could not read the model card %s: %s", readme, err)
        return Provenance(Path(model_dir).name)
    bases = data.get("base_model") or []
    bases = [bases] if isinstance(bases, str) else [str(b) for b in bases]
    made = data.get("tokentransplant") or {}
    donor = made.get("donor_hub_id") or made.get("donor")
    base = bases[0] if bases else made.get("base")
    name = (f"{Path(str(base)).name} with the {Path(str(donor)).name} tokenizer" if base and donor
            else Path(model_dir).name)
    return Provenance(name, bases, data.get("license"), [str(t) for t in data.get("tags") or []])


def turn_end_ids(tokens: list[str], chat_template: str | None) -> tuple[int | None, int | None]:
    """(end-of-turn id, end-of-message id) of the template: the first known marker it uses that is a token."""
    if not chat_template:
        return None, None
    index = {text: idx for idx, text in enumerate(tokens)}

    def first(texts: tuple[str, ...]) -> int | None:
        return next((index[t] for t in texts if t in chat_template and t in index), None)

    return first(EOT_TEXTS), first(EOM_TEXTS)


def write_provenance(writer, provenance: Provenance) -> None:
    """`general.base_model.*`, `general.license`, `general.tags` on a `gguf.GGUFWriter` (the name goes with
    the hyperparameters)."""
    if provenance.base_models:
        writer.add_base_model_count(len(provenance.base_models))
        for i, hub_id in enumerate(provenance.base_models):
            org, _, repo = hub_id.rpartition("/")
            writer.add_base_model_name(i, repo)
            if org:
                writer.add_base_model_organization(i, org)
            writer.add_base_model_repo_url(i, f"https://huggingface.co/{hub_id}")
    if provenance.license:
        writer.add_license(str(provenance.license))
    if provenance.tags:
        writer.add_tags(provenance.tags)
