"""What the two registries share: typed options and discovery through package entry points.

Initializers (`transplant.init.registry`) and distillation losses (`distill.losses.registry`) are both
plug-ins: each declares its options as `Option`s when it registers, so a bad value is refused with one line
before any model loads, and each is found through an entry-point group (`tokentransplant.initializers`,
`tokentransplant.losses` in pyproject.toml), so an outside package adds one the way the built-in ones are.
This module sits on the lowest layer so that both registries, in different layers, can import it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from transplant.errors import TransplantError
from transplant.recipes import parse_bool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    """One option a method or loss accepts: its type, default, bounds and one line of help.

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
    metavar: str | None = None  # how listings name the value type (default: the type's name)

    def coerce(self, value: Any, owner: str, prefix: str = "--set ") -> Any:
        """The typed value, or a one-line error naming the setting (`{prefix}{name}={value}`), its `owner`
        ("method 'omp'", "loss 'alm'"), what it got and what it takes."""
        if value is None and self.default is None:
            return None
        setting = f"{prefix}{self.name}={value}"
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
            raise TransplantError(f"{setting}: {err or 'bad value'} for {owner}; {self.describe()}") from None
        if not _finite_64bit(parsed):  # inf/nan, or an int torch and numpy cannot take (a seed of 10**22)
            raise TransplantError(f"{setting}: not a finite number within 64 bits for {owner}; "
                                  f"{self.describe()}")
        if self.choices is not None and parsed not in self.choices:
            raise TransplantError(f"{setting}: not one of {', '.join(map(str, self.choices))}")
        low_ok = self.min is None or not isinstance(parsed, int | float) or parsed >= self.min
        high_ok = self.max is None or not isinstance(parsed, int | float) or parsed <= self.max
        if not (low_ok and high_ok):
            raise TransplantError(f"{setting}: out of range for {owner}; {self.describe()}")
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


def check_unique(kind: str, name: str, existing: Callable | None, fn: Callable) -> None:
    """Refuse a second `kind` named `name` (two modules would silently fight over it); the same function
    registered again by a reloaded module (importlib.reload, `python -m`) is the same plug-in again."""
    if existing is None or existing is fn:
        return
    if (existing.__module__, existing.__qualname__) == (fn.__module__, fn.__qualname__):
        log.debug("%s %r re-registered by a reloaded module", kind, name)
        return
    first, second = f"{existing.__module__}.{existing.__qualname__}", f"{fn.__module__}.{fn.__qualname__}"
    raise TransplantError(f"{kind} {name!r} is registered twice ({first} and {second}); rename one of them")


def load_entry_points(group: str, builtin: str, kind: str) -> None:
    """Import the module of every entry point in `group`; each module's `@register` does the rest.

    Modules under `builtin` (a module prefix such as "transplant.init.") are the project's own: they must be
    there and load, and their absence means the package metadata is missing. Another package's plug-in that
    fails to load is logged and skipped, so it cannot take the built-in ones down with it.
    """
    found = entry_points(group=group)
    if not any(entry.value.startswith(builtin) for entry in found):
        raise TransplantError(
            f"no built-in {kind} of tokentransplant is registered (package metadata missing); install it "
            "with `pip install -e .` from the repository root"
        )
    for entry in found:
        own = entry.value.startswith(builtin)
        try:
            entry.load()
        except ModuleNotFoundError as err:  # installed metadata names a module this tree lacks
            if not own:
                log.warning("%s plug-in %s (%s) is not installed: %s", kind, entry.name, entry.value, err)
                continue
            raise TransplantError(
                f"{kind} {entry.name!r} is registered by the installed package metadata but its module "
                f"{entry.value} is missing ({err}); reinstall with `pip install -e .`"
            ) from err
        except Exception as err:
            if own:
                raise
            log.warning("%s plug-in %s (%s) failed to load: %s", kind, entry.name, entry.value, err)
