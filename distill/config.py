"""Recipes: one YAML file per job, read into typed dataclasses, with dotted `key=value` overrides.

A recipe is data the user edits, so every mistake must surface before any model loads: unknown keys (typos)
and values of the wrong type fail with the list of what is allowed. Strings may reference other keys as
`${dotted.key}` (usually `${output_dir}`), so that one variable moves every path of a run. PyYAML reads `1e-4`
as a string (YAML 1.1), hence values are coerced to the field's declared type rather than trusted.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transplant.errors import TransplantError


@dataclass
class PrepareConfig:
    """How to create the student when its dir is missing: `transplant(base, donor, method)`."""

    base: str = ""
    donor: str = ""
    method: str = "fvt"
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    path: str = ""  # local HF dir or an alias known to transplant.assets.catalog (e.g. smollm2-135m)
    dtype: str = "auto"  # auto = bf16 on GPUs that support it, else fp32
    trust_remote_code: bool = False
    prepare: PrepareConfig | None = None  # student only: build it first if `path` does not exist


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # .txt / .jsonl files, dirs of them, or `texts:NAME` corpora
    train_bytes: int = 2_000_000  # bytes taken from each `texts:NAME` corpus
    max_length: int = 256  # tokens per packed sequence, per side
    chat_template: str = "auto"  # auto | own | plain: how jsonl `messages` are rendered (see distill.data)
    shuffle: bool = True
    pack: bool = True  # several documents per sequence (no padding waste) vs one document per sequence
    prefetch: bool = True  # build the next step's batches in a thread while this step computes


@dataclass
class LossConfig:
    name: str = "alm"  # alm | alm-l1 | ce | uld | mined (distill.losses registry)
    options: dict = field(default_factory=dict)  # per loss name: {alm: {temperature: 100}, uld: {top_k: 4096}}
    ce_weight: float = 0.0  # adds the student's own next-token CE (an anchor) to a distillation loss


@dataclass
class OptimConfig:
    lr: float = 1e-4
    embedding_lr: float | None = None  # None = lr; new embeddings often want a larger one
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    embeddings_only_steps: int = 0  # first N steps update only input+output embeddings
    seed: int = 0
    gradient_checkpointing: bool = False  # True: ~1/3 more compute, activations no longer bound memory
    log_every: int = 1
    resume: bool = False  # continue from the last checkpoint in checkpoint.dir
    stop_after: int = 0  # >0: stop after this step as if killed (no export): time-boxed jobs, resume tests


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"])
    train_embeddings: bool = True  # a transplanted model's new embeddings must learn, LoRA or not


@dataclass
class EvalConfig:
    every: int = 0  # steps between held-out BPB evaluations (0 = only at start/end)
    texts: list = field(default_factory=list)  # files or `texts:NAME` held-out slices
    n_bytes: int = 20_000  # bytes per `texts:NAME` slice
    max_length: int = 512
    at_start: bool = True
    teacher: bool = True  # also report the teacher's BPB once (the target to heal towards)


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


_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _base_type(hint: Any) -> Any:
    """`float | None` -> (float, allows None); nested dataclasses and plain types as they are."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        return real[0], type(None) in args
    return hint, False


def _coerce(value: Any, hint: Any, where: str) -> Any:
    kind, nullable = _base_type(hint)
    if value is None:
        if nullable:
            return None
        raise TransplantError(f"recipe key {where} may not be null; give a value or delete the line")
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TransplantError(f"recipe key {where} must be a mapping of {kind.__name__} fields")
        return _build(kind, value, where)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
        if kind is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError) as err:
        raise TransplantError(f"recipe key {where}={value!r} is not a valid {kind.__name__}; fix the value") from err
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise TransplantError(f"unknown recipe key {prefix}{unknown[0]}; known keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise TransplantError(f"override {dotted}: {key} is not a mapping; check the key path")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=10` -> ("train.steps", 10); the value is read as YAML (lists, bools, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TransplantError(f"override {text!r} is not key=value; write e.g. --set train.steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise TransplantError(f"override {text!r}: the value is not valid YAML; quote it") from err
    return key.strip(), value


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise TransplantError(f"recipe reference ${{{dotted}}} names no key; fix the reference")
        node = node[key]
    return node


def _interpolate(node: Any, root: dict, depth: int = 0) -> Any:
    if depth > 10:
        raise TransplantError("recipe references ${...} are circular; fix them")
    if isinstance(node, dict):
        return {k: _interpolate(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, root, depth) for v in node]
    if isinstance(node, str) and "${" in node:
        whole = _REFERENCE.fullmatch(node)
        if whole:  # a bare reference keeps the referenced value's type
            return _interpolate(_lookup(root, whole.group(1)), root, depth + 1)
        return _REFERENCE.sub(lambda m: str(_interpolate(_lookup(root, m.group(1)), root, depth + 1)), node)
    return node


def _defaults_as_dict() -> dict:
    return dataclasses.asdict(Recipe())


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and out[key]:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> Recipe:
    """Read a recipe file (or a dict), apply `key=value` overrides, resolve `${...}`, validate and type it."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TransplantError(f"recipe {path} does not exist; pass a YAML file (see recipes/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise TransplantError(f"recipe {path} is not valid YAML ({err}); fix the file") from err
        if not isinstance(raw, dict):
            raise TransplantError(f"recipe {path} must be a mapping of keys at the top level")
    if data:
        raw = _merge(raw, copy.deepcopy(data))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    # Defaults are filled before ${...} is resolved, so that a reference may name a default too.
    merged = _merge(_defaults_as_dict(), raw)
    merged["recipe_path"] = str(path) if path is not None else ""
    return _build(Recipe, _interpolate(merged, merged))


def recipe_relative(recipe: Recipe, value: str) -> Path:
    """A path as written, else relative to the recipe file's folder (recipes name their DeepSpeed JSON so)."""
    candidate = Path(value).expanduser()
    if candidate.exists() or candidate.is_absolute() or not recipe.recipe_path:
        return candidate
    beside = Path(recipe.recipe_path).parent / value
    return beside if beside.exists() else candidate
