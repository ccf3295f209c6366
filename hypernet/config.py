"""Hypernetwork training recipes (`hypernet train RECIPE.yaml --set key=value`), read into the typed dataclasses
below by the loader `distill` uses too (`transplant.recipes`): unknown keys and wrong types fail before the
base model loads. The comment after each field is its documentation; recipes/hypernet_smollm2_cpu.yaml is a
worked example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypernet.model import HypernetConfig
from transplant import recipes
from transplant.errors import TransplantError

# The architecture's defaults live on HypernetConfig (what a saved hypernetwork records); the recipe reuses them.
_ARCH = {f.name: f.default for f in dataclasses.fields(HypernetConfig) if f.default is not dataclasses.MISSING}


@dataclass
class ModelSection:
    """The hypernetwork's architecture (`hypernet.model.HypernetConfig` minus what the base model decides)."""

    d_model: int = _ARCH["d_model"]  # encoder width (the base dim is projected down); bigger = slower, more capacity
    layers: int = _ARCH["layers"]
    heads: int = _ARCH["heads"]
    ff_mult: int = _ARCH["ff_mult"]
    max_pieces: int = _ARCH["max_pieces"]  # base pieces per token read by the encoder (longer are truncated)
    pooling: str = _ARCH["pooling"]  # first (a learned summary slot) | mean
    dropout: float = _ARCH["dropout"]


@dataclass
class HypernetRecipe:
    base: str = "smollm2-135m"  # frozen base LM: an alias or an HF model dir
    output_dir: str = "out/hypernet"  # the hypernetwork lands here; checkpoints in <output_dir>/checkpoint
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None = torch's default)
    steps: int = 200  # upper bound on optimizer steps
    max_minutes: float | None = None  # wall-clock budget; the checkpoint and the hypernetwork are written at the end
    save_every: int = 50  # checkpoint period in steps
    resume: bool = False  # continue from <output_dir>/checkpoint when it exists
    log_every: int = 10
    # data: `{name: bytes}` of built-in training text (transplant.assets.texts) or one UTF-8 text file
    corpus: dict[str, int] | str = field(default_factory=lambda: {"english": 200_000, "code": 100_000})
    batch_size: int = 4  # text windows per step
    seq_len: int = 64  # tokens per window (with the sampled tokenizer)
    # tokenizer sampling
    vocab_size: list[int] = field(default_factory=lambda: [4000, 32000])  # [low, high], sampled log-uniformly
    noise: float = 1.0  # Gumbel noise on log counts: higher = more diverse, rarer vocabularies
    resample_every: int = 10  # steps per sampled tokenizer
    real_tokenizers: list[str] = field(default_factory=list)  # real tokenizers mixed in (aliases or paths)
    real_prob: float = 0.0  # probability of drawing one of them instead of a sampled one
    # loss
    negatives: int = 512  # random extra output rows in the subset softmax
    lm_every: int = 1  # the (expensive) LM loss every N-th step
    lm_weight: float = 1.0  # the base LM's next-token loss with predicted embeddings (the real objective)
    aux_weight: float = 1.0  # base tokens rebuilt from shorter base pieces (cheap dense supervision)
    aux_tokens: int = 256
    predict_shared: bool = False  # true: also predict tokens the base has (ZeTT); false: copy them, as at apply
    # optimiser (AdamW)
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 20  # linear warmup steps
    grad_clip: float = 1.0
    model: ModelSection = field(default_factory=ModelSection)

    def __post_init__(self) -> None:
        if len(self.vocab_size) != 2 or not 0 < self.vocab_size[0] <= self.vocab_size[1]:
            raise TransplantError(f"recipe key vocab_size={self.vocab_size} must be [low, high] with 0 < low <= high; "
                                  "fix the value, e.g. vocab_size=[4000, 32000]")
        for name in ("steps", "batch_size", "seq_len", "resample_every", "lm_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise TransplantError(f"recipe key {name}={getattr(self, name)} must be at least 1; fix the value")
        if not 0.0 <= self.real_prob <= 1.0:
            raise TransplantError(f"recipe key real_prob={self.real_prob} must be in [0, 1]; fix the value")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | Path | None = None, overrides: Iterable[str] = (),
                data: Mapping[str, Any] | None = None) -> HypernetRecipe:
    """Read a hypernetwork recipe (and/or a mapping laid over it) with `--set` overrides ("model.layers=3")."""
    return recipes.load_recipe(HypernetRecipe, path, overrides, data)
