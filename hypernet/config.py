"""Hypernetwork training recipes (`hypernet train RECIPE.yaml --set key=value`), read into the typed
dataclasses below by the loader `distill` uses too (`transplant.recipes`): unknown keys and wrong types fail
before the base model loads. The comment after each field is its documentation;
recipes/hypernet_smollm2_cpu.yaml (2-core CPU) and recipes/hypernet_zett_8gpu.yaml (GPUs, bf16, ZeRO-2) are
worked examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypernet.model import HypernetConfig
from hypernet.sample import PRETOKENIZERS
from transplant import recipes
from transplant.errors import TransplantError

# The architecture's defaults live on HypernetConfig (what a saved hypernetwork records); the recipe reuses
# them.
_ARCH = {f.name: f.default for f in dataclasses.fields(HypernetConfig)
         if f.default is not dataclasses.MISSING}

# Size presets: width / depth / heads / FFN factor. 0 means "the base model's hidden size" (width) or
# "width / 128" (heads). ZeTT's hypernetworks for Mistral-7B and Llama-3-8B are 3 layers as wide as the base
# (4096, FFN 8192, 32 heads); the zett-* presets follow that shape, sized for 1-8B bases.
PRESETS: dict[str, dict[str, int]] = {
    "cpu-2m": {"d_model": 256, "layers": 2, "heads": 4, "ff_mult": 2},  # 1.4M (tied) - 1.7M on 576-640-dim
    #                                                                     bases
    "zett": {"d_model": 0, "layers": 3, "heads": 0, "ff_mult": 2},  # as wide as the base, whatever it is
    "zett-1b": {"d_model": 2048, "layers": 3, "heads": 16, "ff_mult": 2},  # 109M; TinyLlama / Llama-3.2-1B
    "zett-3b": {"d_model": 3072, "layers": 3, "heads": 24, "ff_mult": 2},  # 246M; Llama-3.2-3B / Qwen2.5-3B
    "zett-8b": {"d_model": 4096, "layers": 3, "heads": 32, "ff_mult": 2},  # 436M (470M untied); Mistral-7B
}


@dataclass
class ModelSection:
    """The hypernetwork's architecture: a preset, any field of which can be overridden (`model.layers=3`)."""

    d_model: int | None = None  # encoder width (the base dim is projected to it); None: the preset's
    layers: int | None = None
    heads: int | None = None
    ff_mult: int | None = None
    max_pieces: int = _ARCH["max_pieces"]  # base pieces per token read by the encoder (longer are truncated)
    pooling: str = _ARCH["pooling"]  # first (a learned summary slot) | mean
    dropout: float = _ARCH["dropout"]
    preset: str = "cpu-2m"  # cpu-2m | zett | zett-1b | zett-3b | zett-8b (see PRESETS above)

    def architecture(self, base_dim: int) -> dict[str, Any]:
        """The HypernetConfig fields for a base of hidden size `base_dim` (preset, then explicit
        overrides)."""
        arch = dict(PRESETS[self.preset])
        for name in ("d_model", "layers", "heads", "ff_mult"):
            if getattr(self, name) is not None:
                arch[name] = getattr(self, name)
        arch["d_model"] = arch["d_model"] or base_dim
        arch["heads"] = arch["heads"] or max(1, arch["d_model"] // 128)
        if arch["d_model"] % arch["heads"]:
            raise TransplantError(f"hypernetwork width {arch['d_model']} is not divisible by "
                                  f"{arch['heads']} heads; "
                                  "set model.heads to a divisor of model.d_model")
        return {**arch, "max_pieces": self.max_pieces, "pooling": self.pooling, "dropout": self.dropout}


@dataclass
class HypernetRecipe:
    base: str = "smollm2-135m"  # frozen base LM: an alias or an HF model dir
    output_dir: str = "out/hypernet"  # the hypernetwork lands here; checkpoints in <output_dir>/checkpoint
    seed: int = 0
    threads: int | None = None  # torch CPU threads per process (None = torch's default)
    # hardware
    device: str = "auto"  # auto (CUDA when torch sees one, else CPU) | cpu | cuda
    dtype: str = "auto"  # LM and hypernetwork compute dtype: auto = bf16 on GPUs that have it, else fp32
    nproc: int = 1  # data-parallel processes started on this machine (torchrun); 1 = this process
    zero_stage: int = 2  # DeepSpeed ZeRO stage for the hypernetwork (0-2)
    lm_shard: str = "none"  # the frozen LM: none = whole on every process (fastest while it fits) | zero3 =
    #                         1/N per process, layers gathered in forward and backward | offload = zero3 in
    #                         CPU RAM
    # schedule
    steps: int = 200  # upper bound on optimizer steps
    max_minutes: float | None = None  # wall-clock budget; the checkpoint and the hypernetwork are written at
    #                                   the end
    save_every: int = 50  # checkpoint period in steps (only the newest checkpoint is kept)
    resume: bool = False  # continue from <output_dir>/checkpoint when it exists (exactly: same batches, same
    #                       RNG)
    log_every: int = 10
    # data: `{name: bytes}` of built-in training text (transplant.assets.texts), or a path: one .txt/.jsonl
    # file (optionally .gz) or a folder of them, streamed (memory does not grow with the corpus)
    corpus: dict[str, int] | str = field(default_factory=lambda: {"english": 200_000, "code": 100_000})
    batch_size: int = 4  # text windows per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * nproc)
    seq_len: int = 64  # tokens per window (with the sampled tokenizer)
    # tokenizer sampling
    sampler: str = "batch"  # batch: each tokenizer from its own text block's substring counts (ZeTT) |
    #                         corpus: all tokenizers from one bounded sample's counts (stats_bytes)
    block_bytes: int = 1_000_000  # text read per sampled tokenizer; its windows train the next resample_every
    #                               steps
    stats_bytes: int = 4_000_000  # sampler=corpus: bytes of the stream counted once at start
    vocab_size: list[int] = field(default_factory=lambda: [4000, 32000])  # [low, high], sampled log-uniformly
    noise: float = 1.0  # Gumbel noise on log counts: higher = more diverse, rarer vocabularies
    resample_every: int = 10  # optimizer steps per sampled tokenizer
    pretokenizers: list[str] = field(default_factory=lambda: ["gpt2", "gpt4"])  # word-splitting styles, one
    #                         drawn per sampled tokenizer (hypernet.sample.PRETOKENIZERS); gpt4 is what makes
    #                         Llama 3 / Qwen / tekken tokens like `):\n` seen in training (RESULTS, Gemma-3
    #                         base)
    real_tokenizers: list[str] = field(default_factory=list)  # real tokenizers mixed in (aliases or paths)
    real_prob: float = 0.0  # probability of drawing one of them instead of a sampled one
    # loss
    negatives: int = 512  # random extra output rows in the subset softmax
    lm_every: int = 1  # the (expensive) LM loss every N-th step
    lm_weight: float = 1.0  # the base LM's next-token loss with predicted embeddings (the real objective)
    aux_weight: float = 1.0  # base tokens rebuilt from shorter base pieces (cheap dense supervision)
    aux_tokens: int = 256
    # true: also predict tokens the base has (ZeTT); false: copy them, as at apply
    predict_shared: bool = False
    # optimiser (AdamW)
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 20  # linear warmup steps
    grad_clip: float = 1.0
    model: ModelSection = field(default_factory=ModelSection)

    def __post_init__(self) -> None:
        if len(self.vocab_size) != 2 or not 0 < self.vocab_size[0] <= self.vocab_size[1]:
            raise TransplantError(f"recipe key vocab_size={self.vocab_size} must be [low, high] with 0 "
                                  "< low <= high; fix the value, e.g. vocab_size=[4000, 32000]")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "resample_every", "lm_every",
                     "save_every", "log_every", "nproc", "block_bytes", "stats_bytes"):
            if getattr(self, name) < 1:
                raise TransplantError(f"recipe key {name}={getattr(self, name)} must be at least "
                                      "1; fix the value")
        if not 0.0 <= self.real_prob <= 1.0:
            raise TransplantError(f"recipe key real_prob={self.real_prob} must be in [0, 1]; fix the value")
        if self.lm_weight <= 0 and self.aux_weight <= 0:
            raise TransplantError("recipe keys lm_weight and aux_weight are both 0: nothing to "
                                  "train; set one > 0")
        if self.aux_weight <= 0 and self.lm_every > 1:
            raise TransplantError(f"recipe key lm_every={self.lm_every} with aux_weight=0 leaves steps "
                                  "without a loss; set lm_every=1 or aux_weight > 0")
        unknown = [style for style in self.pretokenizers if style not in PRETOKENIZERS]
        if unknown or not self.pretokenizers:
            raise TransplantError(f"recipe key pretokenizers={self.pretokenizers} must list some of "
                                  f"{', '.join(PRETOKENIZERS)}; fix the value, e.g. "
                                  "pretokenizers=[gpt2, gpt4]")
        if self.sampler not in ("batch", "corpus"):
            raise TransplantError(f"recipe key sampler={self.sampler!r} is unknown; use batch or corpus")
        if self.zero_stage not in (0, 1, 2):
            raise TransplantError(f"recipe key zero_stage={self.zero_stage}: the hypernetwork trains "
                                  "with ZeRO 0, 1 or 2 (it is small; ZeRO-3 would shard it for "
                                  "nothing); fix the value")
        if self.lm_shard not in ("none", "zero3", "offload"):
            raise TransplantError(f"recipe key lm_shard={self.lm_shard!r} is unknown; use none, "
                                  "zero3 or offload")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TransplantError(f"recipe key device={self.device!r} is unknown; use auto, cpu or cuda")
        if self.model.preset not in PRESETS:
            raise TransplantError(f"recipe key model.preset={self.model.preset!r} is unknown; choose one of "
                                  f"{', '.join(PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | Path | None = None, overrides: Iterable[str] = (),
                data: Mapping[str, Any] | None = None) -> HypernetRecipe:
    """Read a hypernetwork recipe (and/or a mapping laid over it) with `--set` overrides
    ("model.layers=3")."""
    return recipes.load_recipe(HypernetRecipe, path, overrides, data)
