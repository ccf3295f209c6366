"""What architectures call their embedding matrices, in one place.

Two layers need it: the surgery (`transplant.io.surgery`, which tensors to replace) and the hub downloader
(`transplant.assets.hub`, which safetensors shards of a donor to fetch when only its embeddings are used). The
downloader sits below the surgery, so the names live here, with no knowledge of shapes: the index of a sharded
checkpoint names its tensors but not their shapes, and the shards are what we do not want to download.
"""

from __future__ import annotations

from collections.abc import Iterable

# Exact names first (most common architectures), then suffixes for wrappers that add a prefix.
INPUT_NAMES = (
    "model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight", "transformer.word_embeddings.weight",
    "transformer.embedding.word_embeddings.weight", "model.tok_embeddings.weight", "tok_embeddings.weight",
    "backbone.embeddings.weight", "backbone.embedding.weight", "embed_tokens.weight", "wte.weight",
)
INPUT_SUFFIXES = (".embed_tokens.weight", ".wte.weight", ".word_embeddings.weight", ".embed_in.weight",
                  ".tok_embeddings.weight")
# Masked LMs keep an untied decoder under their prediction head (RoBERTa `lm_head.decoder`, BERT
# `cls.predictions.decoder`, DistilBERT `vocab_projector`).
OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight", "language_model.lm_head.weight", "output.weight",
                "transformer.output_layer.weight", "lm_head.decoder.weight", "cls.predictions.decoder.weight",
                "vocab_projector.weight")
OUTPUT_SUFFIXES = (".lm_head.weight", ".embed_out.weight")


def is_embedding_name(name: str) -> bool:
    """Whether `name` is, by convention, an input or output embedding matrix of some architecture."""
    return name in INPUT_NAMES or name in OUTPUT_NAMES or name.endswith(INPUT_SUFFIXES + OUTPUT_SUFFIXES)


def embedding_names(names: Iterable[str]) -> list[str]:
    """The names among `names` that are embedding matrices by convention (see `is_embedding_name`)."""
    return [name for name in names if is_embedding_name(name)]
