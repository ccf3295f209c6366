"""One registry of initializers by name; each method lives in its own module and registers itself."""

from __future__ import annotations

from collections.abc import Callable

from transplant.errors import TransplantError
from transplant.init.base import InitContext, InitPlan

Initializer = Callable[[InitContext], InitPlan]
INITIALIZERS: dict[str, Initializer] = {}
NEEDS_DONOR: set[str] = set()


def register(name: str, *, needs_donor: bool = False) -> Callable[[Initializer], Initializer]:
    def decorator(fn: Initializer) -> Initializer:
        INITIALIZERS[name] = fn
        if needs_donor:
            NEEDS_DONOR.add(name)
        return fn

    return decorator


def get_initializer(name: str) -> Initializer:
    _load_builtin_methods()
    try:
        return INITIALIZERS[name]
    except KeyError as err:
        raise TransplantError(f"unknown method {name!r}; choose one of: {', '.join(sorted(INITIALIZERS))}") from err


def needs_donor(name: str) -> bool:
    """Whether the method reads the donor's embeddings (so a hub donor must be fetched with its weights)."""
    get_initializer(name)
    return name in NEEDS_DONOR


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(INITIALIZERS)


def _load_builtin_methods() -> None:
    import transplant.init.methods  # noqa: F401  (registers the built-in methods)
