"""Distillation recipes: one YAML file per job, read into the typed dataclasses below.

Loading, `--set a.b=value` overrides, `${output_dir}` references and the one-line errors for unknown keys and
wrong types are `transplant.recipes`, shared with `hypernet`; this module only declares what a distillation
recipe holds. The comment after each field is its documentation (recipes/README.md points here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transplant import recipes


@dataclass
class PrepareConfig:
    """How to create the student when its dir is missing: `transplant(base, donor, method)`."""

    base: str = ""
    donor: str = ""
    method: str = "fvt"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    path: str = ""  # local HF dir or an alias known to transplant.assets.catalog (e.g. smollm2-135m)
    dtype: str = "auto"  # auto = bf16 on GPUs that support it, else fp32
    trust_remote_code: bool = False
    prepare: PrepareConfig | None = None  # student only: build it first if `path` does not exist
    shard: str = "none"  # teacher only: none (replicated) | zero3 (1/N per rank) | offload (weights in CPU
    #                      RAM)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # .txt/.jsonl(.gz) files, dirs of them (read lazily),
    #                                                 texts:NAME
    train_bytes: int = 2_000_000  # bytes taken from each `texts:NAME` corpus
    max_length: int = 256  # tokens per packed sequence, per side
    chat_template: str = "auto"  # auto | own | plain: how jsonl `messages` are rendered (see distill.data)
    shuffle: bool = True
    stratify: bool = False  # small corpora: every source's documents spread evenly over the epoch
    #                         (distill.corpus.stratified_order)
    pack: bool = True  # several documents per sequence (no padding waste) vs one document per sequence
    prefetch: bool = True  # build the next step's batches in a thread while this step computes
    window_index: str = "auto"  # auto (when >1 rank) | always | never: each rank tokenizes only its own
    #                             windows


@dataclass
class LossConfig:
    name: str = "alm"  # a registered loss (distill.losses; `distill --help` lists them, a bad name lists
    #                    them)
    # per loss: {alm: {temperature: 100}, uld: {top_k: 4096}};
    options: dict[str, Any] = field(default_factory=dict)
    # each loss declares its options' types, bounds and defaults (distill/losses/<name>.py)
    ce_weight: float | None = None  # student's own next-token CE added; None = the loss's published weight
    # (alm 1.0, uld 1.0, mined 0.9, alm-l1 and ce 0)
    balance: str | None = None  # sum: loss + ce_weight * ce | gradmag: weights from gradient norms
    # (distill.losses.balance); None = the loss's published way (alm gradmag, the others sum)
    gradmag_at: str = "logits"  # where GradMag measures gradient norms: logits (default: measured equal to
    # block at 17% less step time, bench/RESULTS.md "Healing proven") | block (the last block's trainable
    # parameters, as the reference; ZeRO-3 always uses logits)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    embedding_lr: float | None = None  # None = lr; new embeddings often want a larger one
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    warmup_steps: int = 0
    body_warmup_steps: int | None = None  # warmup of the body after train.embeddings_only_steps (None =
    #                                       warmup_steps)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    impl: str = "auto"  # auto | torch | torch_fused | deepspeed_fused | deepspeed_cpu (see distill.optim)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    embeddings_only_steps: int = 0  # first N steps update only input+output embeddings
    seed: int = 0
    gradient_checkpointing: bool = False  # True: ~1/3 more compute, activations no longer bound memory
    autocast: str = "none"  # none | bf16 | fp16: fp32 weights, forwards in half precision (DeepSpeed
    #                         torch_autocast)
    log_every: int = 1
    resume: bool = False  # continue from the last checkpoint in checkpoint.dir
    stop_after: int = 0  # >0: stop after this step as if killed (no export): time-boxed jobs, resume tests


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    train_embeddings: bool = True  # a transplanted model's new embeddings must learn, LoRA or not


@dataclass
class EvalConfig:
    every: int = 0  # steps between held-out BPB evaluations (0 = only at start/end)
    texts: list[str] = field(default_factory=list)  # files or `texts:NAME` held-out slices
    n_bytes: int = 20_000  # bytes per `texts:NAME` slice
    max_length: int = 512
    at_start: bool = True
    teacher: bool = True  # also report the teacher's BPB once (the target to heal towards)
    agreement: bool = True  # also report disagreement with the teacher (bits/byte, distill.agreement)


@dataclass
class CheckpointConfig:
    dir: str = "${output_dir}/checkpoints"
    every: int = 0  # steps between checkpoints (0 = none)
    keep: int = 2  # newest checkpoints kept on disk


@dataclass
class ExportConfig:
    dir: str = "${output_dir}/final"
    dtype: str = "auto"  # auto = the training dtype; float32 | bfloat16 | float16
    enabled: bool = True


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # >1: `distill` relaunches itself under torchrun when not already distributed
    master_port: int = 0  # 0 = a free port


@dataclass
class Recipe:
    output_dir: str = "out/distill"
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    deepspeed: str = "recipes/deepspeed/zero0_cpu.json"  # DeepSpeed JSON; "auto" fields are filled in
    recipe_path: str = ""  # set by load_recipe (where relative `deepspeed` paths are also looked up)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | Path | None = None, overrides: Iterable[str] = (),
                data: Mapping[str, Any] | None = None) -> Recipe:
    """Read a recipe file (and/or a mapping laid over it), apply `--set` overrides ("train.steps=10"), resolve
    `${...}`, check and type every key (`transplant.recipes.load_recipe`)."""
    recipe = recipes.load_recipe(Recipe, path, overrides, data)
    check_loss(recipe.loss)
    recipe = dataclasses.replace(recipe, recipe_path=str(path) if path is not None else "")
    # a recipe's own data files (recipes/data/...) are found from any working directory, as its DeepSpeed JSON
    train = [s if s.startswith("texts:") else str(recipe_relative(recipe, s)) for s in recipe.data.train]
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, train=train))


def check_loss(loss: LossConfig) -> None:
    """`loss.name` and its `loss.options` block against the loss registry, which holds the valid names and
    each loss's typed options: a typo or a bad value (`temperature=hot`) fails with one line here, when the
    recipe is read, not after the models have loaded."""
    from distill.losses import loss_options

    loss_options(loss.name, loss.options)


def recipe_relative(recipe: Recipe, value: str) -> Path:
    """A path as written, else relative to the recipe file's folder (recipes name their DeepSpeed JSON so)."""
    candidate = Path(value).expanduser()
    if candidate.exists() or candidate.is_absolute() or not recipe.recipe_path:
        return candidate
    beside = Path(recipe.recipe_path).parent / value
    return beside if beside.exists() else candidate
