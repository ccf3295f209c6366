"""One registry of initializers by name; each method lives in its own module, registers itself and
declares its options, so `--set` is checked against a schema before anything is solved.

Every method, built-in or not, is an entry point of the group `tokentransplant.initializers` (pyproject.toml:
`fvt = "transplant.init.fvt"`; the hypernetwork in `hypernet/` and a user's own package the same way). On
first lookup the registry imports each entry point's module once and the module's `@register` does the rest,
so the registry imports no method (no import loop), importing one method never registers another, and adding
a method is one new file plus one line in pyproject.toml (or a `@register` call in code that is imported).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from transplant.errors import TransplantError
from transplant.init.base import InitContext, InitPlan
from transplant.options import Option, check_unique, load_entry_points

__all__ = ["DONOR_OPTIONS", "METHODS", "PIPELINE_OPTIONS", "Method", "Option", "ResolvedMethod",
           "available_methods", "get_initializer", "get_method", "parse_options", "register",
           "resolve_method"]

Initializer = Callable[[InitContext], InitPlan]
ENTRY_POINT_GROUP = "tokentransplant.initializers"


# Options every method accepts: the pipeline applies them after the method's rows are built.
PIPELINE_OPTIONS = (
    Option("numbers", bool, None, "give new number tokens the mean of the base's digit pieces (unset: the "
           "method's measured default: on for mean and focus)"),
    Option("untie", bool, False,
           "give a tied base its own output matrix (a donor lm_head no longer unties it)"),
    Option("unreachable", str, "mean", "rows of tokens the new tokenizer never emits: mean row (no output "
           "mass), zero, or keep", choices=("mean", "zero", "keep")),
    Option("dedup_cosine", float, 0.99, "new rows this cosine-close to a frequent token's row fall back to "
           "fvt (1 disables)", min=0.0, max=1.0),
    Option("dedup_top", int, 4096, "how many frequent base tokens (lowest ids) near-duplicates are checked "
           "against", min=0),
    Option("rescale_norm", str, "off", "rescale new input rows to their base pieces' norm or the base median "
           "(measured worse; true = pieces)", choices=("off", "pieces", "median"),
           parse=lambda v: {"true": "pieces",
                            "false": "off"}.get(str(v).strip().lower(), str(v).strip().lower())),
)

# Options of every method that reads the donor's embeddings (anchor selection in `init/donor.py`).
DONOR_OPTIONS = (
    Option("min_norm_ratio", float, 0.25,
           "drop anchors whose donor row norm is below this × the median", min=0.0),
)


@dataclass(frozen=True)
class Method:
    """A registered method and what the pipeline must know about it, declared at registration.

    `number_rows`: the `numbers` step's default for this method (`--set numbers=true|false` overrides it),
    measured per method (bench/RESULTS.md, "Unreachable rows and fidelity fixes").
    """

    name: str
    initializer: Initializer
    needs_donor: bool
    options: tuple[Option, ...] = field(default_factory=tuple)
    number_rows: bool = False

    @property
    def summary(self) -> str:
        """The first line of the method module's docstring."""
        doc = (sys.modules[self.initializer.__module__].__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def all_options(self) -> tuple[Option, ...]:
        return self.options + (DONOR_OPTIONS if self.needs_donor else ()) + PIPELINE_OPTIONS


@dataclass(frozen=True)
class ResolvedMethod:
    """A method name looked up once, with its `--set` options typed and complete: what the pipeline passes
    down, so nothing below it looks the name up again, re-parses an option or writes a default twice."""

    spec: Method
    options: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_donor(self) -> bool:
        """Whether the method reads the donor's embeddings (a hub donor is then fetched with its weights)."""
        return self.spec.needs_donor

    @property
    def number_rows(self) -> bool:
        """Whether the `numbers` step runs: `--set numbers=...` if given, else the method's default."""
        chosen = self.options["numbers"]
        return self.spec.number_rows if chosen is None else bool(chosen)

    def plan(self, ctx: InitContext) -> InitPlan:
        """Run the initializer with these options as `ctx.options`."""
        return self.spec.initializer(replace(ctx, options=dict(self.options)))


METHODS: dict[str, Method] = {}


def register(name: str, *, needs_donor: bool = False, options: tuple[Option, ...] = (),
             number_rows: bool = False) -> Callable[[Initializer], Initializer]:
    """Register `fn(ctx) -> InitPlan` as method `name` with its `--set` options and its `numbers` default; a
    second method of the same name is an error (two modules would silently fight over it)."""

    def decorator(fn: Initializer) -> Initializer:
        existing = METHODS.get(name)
        check_unique("method", name, existing.initializer if existing else None, fn)
        METHODS[name] = Method(name, fn, needs_donor, tuple(options), number_rows)
        return fn

    return decorator


_discovered = False


def _discover() -> None:
    """Import every `tokentransplant.initializers` entry point's module (once)."""
    global _discovered
    if not _discovered:
        load_entry_points(ENTRY_POINT_GROUP, builtin="transplant.init.", kind="method")
        _discovered = True  # only once every module loaded: a failure is reported again, not turned into gaps


def get_method(name: str) -> Method:
    _discover()
    try:
        return METHODS[name]
    except KeyError:
        raise TransplantError(f"unknown method {name!r}; choose one of: "
                              f"{', '.join(sorted(METHODS))}") from None


def resolve_method(name: str, raw: Mapping[str, Any] | None) -> ResolvedMethod:
    """Method `name` with its options checked (`parse_options`): unknown names, typos and bad values fail
    here, before anything loads."""
    return ResolvedMethod(get_method(name), parse_options(name, raw))


def get_initializer(name: str) -> Initializer:
    """The method as `fn(ctx) -> InitPlan`, with `ctx.options` validated and defaults filled in first (for
    callers that hold a name and a context, such as tests and `focus`'s FVT start)."""
    method = get_method(name)  # an unknown name fails here, not at the first call
    return lambda ctx: ResolvedMethod(method, parse_options(name, ctx.options)).plan(ctx)


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
    owner = f"method {name!r}"
    return {key: (opt.coerce(raw[key], owner) if key in raw else opt.default) for key, opt in schema.items()}
