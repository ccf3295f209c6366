"""One registry of initializers by name; each method lives in its own module, registers itself and declares its
options, so `--set` is checked against a schema before anything is solved.

Every method, built-in or not, is an entry point of the group `tokentransplant.initializers` (pyproject.toml:
`fvt = "transplant.init.fvt"`; the hypernetwork in `hypernet/` and a user's own package the same way). On
first lookup the registry imports each entry point's module once and the module's `@register` does the rest,
so the registry imports no method (no import loop), importing one method never registers another, and adding
a method is one new file plus one line in pyproject.toml (or a `@register` call in code that is imported).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any

from transplant.errors import TransplantError
from transplant.init.base import InitContext, InitPlan
from transplant.recipes import parse_bool

log = logging.getLogger(__name__)

Initializer = Callable[[InitContext], InitPlan]
ENTRY_POINT_GROUP = "tokentransplant.initializers"


@dataclass(frozen=True)
class Option:
    """One `--set name=value` a method accepts: its type, default, bounds and one line of help.

    `parse` replaces the type's own parser for options with a richer syntax (e.g. omp's `prefilter=auto|M`).
    """

    name: str
    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    parse: Callable[[Any], Any] | None = None
    metavar: str | None = None  # how `transplant methods` names the value type (default: the type's name)

    def coerce(self, value: Any, method: str) -> Any:
        """The typed value, or a one-line error naming the option, what it got and what it takes."""
        if value is None and self.default is None:
            return None
        try:
            if self.parse is not None:
                parsed = self.parse(value)
            elif self.type is bool:
                parsed = parse_bool(value)
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            else:
                parsed = self.type(value)
        except (TypeError, ValueError) as err:
            raise TransplantError(
                f"--set {self.name}={value}: {err or 'bad value'} for method {method!r}; {self.describe()}"
            ) from None
        if not _finite_64bit(parsed):  # inf/nan, or an int torch and numpy cannot take (a seed of 10**22)
            raise TransplantError(f"--set {self.name}={value}: not a finite number within 64 bits for method "
                                  f"{method!r}; {self.describe()}")
        if self.choices is not None and parsed not in self.choices:
            raise TransplantError(f"--set {self.name}={value}: not one of {', '.join(map(str, self.choices))}")
        low_ok = self.min is None or not isinstance(parsed, int | float) or parsed >= self.min
        high_ok = self.max is None or not isinstance(parsed, int | float) or parsed <= self.max
        if not (low_ok and high_ok):
            raise TransplantError(f"--set {self.name}={value}: out of range for method {method!r}; {self.describe()}")
        return parsed

    def describe(self) -> str:
        bounds = ""
        if self.choices is not None:
            bounds = f" in {{{', '.join(map(str, self.choices))}}}"
        elif self.min is not None or self.max is not None:
            bounds = f" in [{'' if self.min is None else self.min}, {'' if self.max is None else self.max}]"
        kind = self.metavar or self.type.__name__
        return f"{self.name} ({kind}{bounds}, default {self.default}): {self.help}"


def _finite_64bit(value: Any) -> bool:
    """A float must be finite and an int must fit a signed 64-bit integer; other values pass."""
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# Options every method accepts: the pipeline applies them after the method's rows are built.
PIPELINE_OPTIONS = (
    Option("numbers", bool, None, "give new number tokens the mean of the base's digit pieces (unset: the "
           "method's measured default: on for mean and focus)"),
    Option("untie", bool, False, "give a tied base its own output matrix (a donor lm_head no longer unties it)"),
    Option("unreachable", str, "mean", "rows of tokens the new tokenizer never emits: mean row (no output mass), "
           "zero, or keep", choices=("mean", "zero", "keep")),
    Option("dedup_cosine", float, 0.99, "new rows this cosine-close to a frequent token's row fall back to fvt "
           "(1 disables)", min=0.0, max=1.0),
    Option("dedup_top", int, 4096, "how many frequent base tokens (lowest ids) near-duplicates are checked "
           "against", min=0),
    Option("rescale_norm", str, "off", "rescale new input rows to their base pieces' norm or the base median "
           "(measured worse; true = pieces)", choices=("off", "pieces", "median"),
           parse=lambda v: {"true": "pieces", "false": "off"}.get(str(v).strip().lower(), str(v).strip().lower())),
)

# Options of every method that reads the donor's embeddings (anchor selection in `init/donor.py`).
DONOR_OPTIONS = (
    Option("min_norm_ratio", float, 0.25, "drop anchors whose donor row norm is below this × the median", min=0.0),
)


@dataclass(frozen=True)
class Method:
    name: str
    initializer: Initializer
    needs_donor: bool
    options: tuple[Option, ...] = field(default_factory=tuple)

    @property
    def summary(self) -> str:
        """The first line of the method module's docstring."""
        doc = (sys.modules[self.initializer.__module__].__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def all_options(self) -> tuple[Option, ...]:
        return self.options + (DONOR_OPTIONS if self.needs_donor else ()) + PIPELINE_OPTIONS


METHODS: dict[str, Method] = {}


def register(
    name: str, *, needs_donor: bool = False, options: tuple[Option, ...] = ()
) -> Callable[[Initializer], Initializer]:
    """Register `fn(ctx) -> InitPlan` as method `name` with its `--set` options; a second method of the same
    name is an error (two modules would silently fight over it)."""

    def decorator(fn: Initializer) -> Initializer:
        existing = METHODS.get(name)
        if existing is not None and existing.initializer is not fn:
            if _same_function(existing.initializer, fn):  # the module was imported twice (reload, __main__)
                log.debug("method %r re-registered by a reloaded module", name)
            else:
                raise TransplantError(
                    f"method {name!r} is registered twice ({existing.initializer.__module__} and "
                    f"{fn.__module__}); rename one of them"
                )
        METHODS[name] = Method(name, fn, needs_donor, tuple(options))
        return fn

    return decorator


def _same_function(a: Callable, b: Callable) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


_discovered = False


def _discover() -> None:
    """Import every `tokentransplant.initializers` entry point's module (once)."""
    global _discovered
    if _discovered:
        return
    found = entry_points(group=ENTRY_POINT_GROUP)
    if not any(entry.value.startswith("transplant.init.") for entry in found):
        raise TransplantError(
            "tokentransplant's built-in methods are not registered (package metadata missing); install it with "
            "`pip install -e .` from the repository root"
        )
    for entry in found:
        try:
            entry.load()
        except ModuleNotFoundError as err:  # installed metadata names a module this tree lacks
            if not entry.value.startswith("transplant."):
                log.warning("initializer plug-in %s (%s) is not installed: %s", entry.name, entry.value, err)
                continue
            raise TransplantError(
                f"method {entry.name!r} is registered by the installed package metadata but its module "
                f"{entry.value} is missing ({err}); reinstall with `pip install -e .`"
            ) from err
        except Exception as err:  # a broken plug-in must not take the built-in methods down with it
            if entry.value.startswith("transplant."):
                raise
            log.warning("initializer plug-in %s (%s) failed to load: %s", entry.name, entry.value, err)
    _discovered = True  # only once every module loaded: a failure is reported again, not turned into gaps


def get_method(name: str) -> Method:
    _discover()
    try:
        return METHODS[name]
    except KeyError:
        raise TransplantError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


def get_initializer(name: str) -> Initializer:
    """The method as `fn(ctx) -> InitPlan`, with `ctx.options` validated and defaults filled in first."""
    method = get_method(name)

    def run(ctx: InitContext) -> InitPlan:
        return method.initializer(replace(ctx, options=parse_options(name, ctx.options)))

    return run


def needs_donor(name: str) -> bool:
    """Whether the method reads the donor's embeddings (so a hub donor must be fetched with its weights)."""
    return get_method(name).needs_donor


def available_methods() -> list[str]:
    _discover()
    return sorted(METHODS)


def parse_options(name: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """`--set` values for method `name`, typed and validated, with every default filled in.

    Strings (from the CLI) and typed values (from the Python API) are accepted alike. An unknown key is a
    one-line error listing the method's options, so a typo (`kk=3`) never silently falls back to a default.
    """
    method = get_method(name)
    schema = {opt.name: opt for opt in method.all_options()}
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise TransplantError(
            f"unknown option {', '.join(unknown)} for method {name!r}; valid options: {', '.join(schema)} "
            "(`transplant methods` describes them)"
        )
    return {key: (opt.coerce(raw[key], name) if key in raw else opt.default) for key, opt in schema.items()}
