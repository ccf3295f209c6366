"""The loss registry: each loss registers its function with everything the trainer must know about it.

The trainer names no loss. Whether a loss needs the teacher's forward, which of its metrics add up across
micro-batches and ranks, which options it takes, whether it reads hidden states, which per-pair tables it
needs (MinED's vocabulary map, ALM's boundary masks), which trainable modules it adds (ALM's hidden-state
projection) and with what weight its published recipe adds the student's own CE (ULD, MinED) are all
declared here, next to the loss, by `register`. Options are typed `Option`s with bounds or choices and help
(`transplant.options`, shared with the initializers), so `loss.options.alm.temperature=hot` is refused with
one line when the recipe is read, before any model loads.

Every loss, built-in or not, is an entry point of the group `tokentransplant.losses` (pyproject.toml:
`alm = "distill.losses.alm"`; a user's own package the same way). On first lookup the registry imports each
entry point's module once and the module's `@register` does the rest, so a new loss is one new module with
one `@register(...)` plus one line in pyproject.toml (or a `@register` call in code that is imported).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transplant.errors import TransplantError
from transplant.options import Option, check_unique, load_entry_points
from transplant.tokenizers.vocab import Vocab

ENTRY_POINT_GROUP = "tokentransplant.losses"

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# Every loss returns sum(per-item losses) / global item count, and "num_items_local" counts its local items:
# the values of the micro-batches and ranks of one step add up to the step's value.
ALWAYS_SUMMED = frozenset({"loss", "num_items_local"})

# The loss that `loss.ce_weight` adds to a distillation loss as an anchor: the student's own next-token CE.
ANCHOR_LOSS = "ce"


@dataclass(frozen=True)
class PairContext:
    """What a loss may precompute once per (student, teacher) pair, before the first step."""

    student_vocab: Vocab
    teacher_vocab: Vocab
    options: Mapping[str, Any]  # the loss's own block of `loss.options`, typed and complete
    student_hidden_size: int | None = None  # known once the models are loaded (for `modules`)
    teacher_hidden_size: int | None = None


def _no_extras(ctx: PairContext) -> dict[str, Any]:
    return {}


def _no_hidden_states(options: Mapping[str, Any]) -> bool:
    return False


def _no_modules(ctx: PairContext) -> dict[str, nn.Module]:
    return {}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. Calling it calls `fn`, so `get_loss(name)(batch, num_items=..., **options)` works.

    - `count_items(batch) -> int`: the loss's normaliser for a batch, from the alignment alone (no logits), so
      the trainer can total the global count before the step.
    - `needs_teacher`: False skips loading and running the teacher (plain CE).
    - `sum_metrics`: metric names that are sums over items divided by the global count (or plain counts); the
      trainer adds them over micro-batches and ranks. Every other metric (a local average) is averaged.
      Always holds `ALWAYS_SUMMED`.
    - `prepare(ctx) -> dict`: per-pair extras merged into every batch (vocabulary-sized tables: built once,
      not per step); tensors are moved to the training device by the trainer.
    - `needs_hidden(options) -> bool`: whether, with these options, the loss reads "student_hidden_states" and
      "teacher_hidden_states" (the forwards then return them).
    - `options`: the `Option`s the loss takes (`loss.options.<name>.<option>`), with their types, bounds and
      defaults; the loss is called with all of them, typed.
    - `modules(ctx) -> dict[str, nn.Module]`: trainable modules the loss owns (a projection head). The trainer
      attaches them to the student (so the optimizer, ZeRO and checkpoints see them; the export drops them)
      and hands each to the loss as `batch[name]`.
    - `ce_weight`: the weight of the student's own next-token CE (the `ANCHOR_LOSS`) that the loss's published
      recipe adds; `loss.ce_weight` in a recipe overrides it.
    - `balance`: how that CE joins the loss in the published recipe: "sum" (loss + ce_weight * CE) or
      "gradmag" (weights from gradient norms, `distill.losses.balance`); `loss.balance` overrides it.
    """

    name: str
    fn: LossFn
    count_items: Callable[[Mapping[str, Any]], int]
    needs_teacher: bool = True
    sum_metrics: frozenset[str] = ALWAYS_SUMMED
    prepare: Callable[[PairContext], dict[str, Any]] = _no_extras
    needs_hidden: Callable[[Mapping[str, Any]], bool] = _no_hidden_states
    options: tuple[Option, ...] = ()
    modules: Callable[[PairContext], dict[str, nn.Module]] = _no_modules
    ce_weight: float = 0.0
    balance: str = "sum"

    def __call__(self, batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
                 **options: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.fn(batch, num_items=num_items, **options)

    @property
    def summary(self) -> str:
        """The first line of the loss module's docstring (for `--help` listings)."""
        doc = (sys.modules[self.fn.__module__].__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


LOSSES: dict[str, LossSpec] = {}


def check_declared(name: str, fn: Callable, options: tuple[Option, ...]) -> None:
    """A loss's keyword parameters (but `num_items`) and its declared options must be the same names with the
    same defaults, so no option escapes the check and no default is written twice with two values; a loss
    taking `**options` (one forwarding to another) is checked where it forwards."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    keywords = {k: p.default for k, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "num_items"}
    declared = {opt.name: opt.default for opt in options}
    if keywords != declared:
        raise TransplantError(f"loss {name!r}: {fn.__module__}.{fn.__qualname__} takes {keywords} but "
                              f"declares options {declared}; declare one Option per keyword parameter, "
                              "same default")


def register(name: str, *, count_items: Callable[[Mapping[str, Any]], int], needs_teacher: bool = True,
             sum_metrics: Iterable[str] = (), prepare: Callable[[PairContext], dict[str, Any]] | None = None,
             needs_hidden: Callable[[Mapping[str, Any]], bool] | None = None, options: Iterable[Option] = (),
             modules: Callable[[PairContext], dict[str, nn.Module]] | None = None,
             ce_weight: float = 0.0, balance: str = "sum") -> Callable[[LossFn], LossFn]:
    """Register `fn(batch, *, num_items=None, **options) -> (loss, metrics)` as loss `name` (fields:
    `LossSpec`).

    A second loss of the same name is an error: two modules would otherwise silently fight over which one a
    recipe trains with (the same function again, from a reloaded module, is not). Returns `fn` unchanged."""

    def wrap(fn: LossFn) -> LossFn:
        existing = LOSSES.get(name)
        check_unique("loss", name, existing.fn if existing else None, fn)
        check_declared(name, fn, tuple(options))
        LOSSES[name] = LossSpec(
            name=name, fn=fn, count_items=count_items, needs_teacher=needs_teacher,
            sum_metrics=ALWAYS_SUMMED | frozenset(sum_metrics), prepare=prepare or _no_extras,
            needs_hidden=needs_hidden or _no_hidden_states, options=tuple(options),
            modules=modules or _no_modules, ce_weight=float(ce_weight), balance=balance)
        return fn

    return wrap


_discovered = False


def _discover() -> None:
    """Import every `tokentransplant.losses` entry point's module (once)."""
    global _discovered
    if not _discovered:
        load_entry_points(ENTRY_POINT_GROUP, builtin="distill.losses.", kind="loss")
        _discovered = True  # only once every module loaded: a failure is reported again, not turned into gaps


def available_losses() -> list[str]:
    """The registered loss names (built-in and plug-ins), sorted."""
    _discover()
    return sorted(LOSSES)


def get_loss(name: str) -> LossSpec:
    _discover()
    try:
        return LOSSES[name]
    except KeyError:
        choices = ", ".join(sorted(LOSSES))
        raise TransplantError(f"unknown distillation loss {name!r}; choose one of: {choices}") from None


def loss_options(name: str, per_loss: Mapping[str, Any]) -> dict[str, Any]:
    """Loss `name`'s block of the recipe's `loss.options`, typed and validated, with every default filled in.

    Options are keyed by loss name, so that switching `loss.name` never feeds one loss another's options (e.g.
    ALM's temperature 100 to ULD); a key that is no loss name is a misplaced option. Another loss's block is
    not checked against its options (a recipe may keep blocks for several losses)."""
    spec = get_loss(name)
    strays = sorted(set(per_loss) - set(LOSSES))
    if strays:
        raise TransplantError(f"loss.options.{strays[0]}: options are keyed by loss name "
                              f"({', '.join(sorted(LOSSES))})"
                              f", e.g. loss.options.alm.temperature=100")
    options = dict(per_loss.get(name) or {})
    schema = {opt.name: opt for opt in spec.options}
    unknown = sorted(set(options) - set(schema))
    if unknown:
        raise TransplantError(f"loss.options.{name}.{unknown[0]} is not an option of loss {name!r}; "
                              f"it takes: {', '.join(schema) or 'none'}")
    owner, prefix = f"loss {name!r}", f"loss.options.{name}."
    return {key: (opt.coerce(options[key], owner, prefix) if key in options else opt.default)
            for key, opt in schema.items()}
