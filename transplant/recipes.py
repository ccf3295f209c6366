"""Settings a user types, read one way everywhere: YAML recipes as typed dataclasses, `--set a.b=value`
assignments, and on/off words.

`load_recipe(RecipeClass, path, overrides)` reads a YAML file into a tree of dataclasses (`distill.config`,
`hypernet.config` declare theirs). A recipe is data the user edits, so every mistake surfaces before any model
loads, as one line that names the problem and the fix: an unknown key (a typo, in the file or in a `--set`)
lists the keys valid at that level; a value of the wrong type names the key, the value and the type; broken
YAML names the file, the line and the problem. Strings may reference other keys as `${dotted.key}` (usually
`${output_dir}`), so one variable moves every path of a run; defaults are filled in before references are
resolved, so a reference may name a default too.

Why this small loader and not OmegaConf structured configs:
- no new dependency: PyYAML is needed anyway, and this file is the whole of it;
- values are coerced to the declared field type, so YAML 1.1 quirks do not leak (PyYAML reads `1e-4` as a
  string, `on` as a bool), and the same coercion serves `--set` values and file values;
- errors are one line and list the valid keys; OmegaConf's `ConfigKeyError` is a multi-line report
  (full_key, reference_type, object_type) that names neither the valid keys nor the fix;
- fields typed `dict | str` (a corpus given as `{name: bytes}` or as a file) are plain here; OmegaConf's
  unions take primitive types only;
- the result is plain dataclasses holding plain values (no `DictConfig` proxies), so the trainers,
  `dataclasses.asdict` and `yaml.safe_dump` take them as they are.
The one OmegaConf feature the recipes use, `${key}` interpolation, is `_interpolate` below.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from transplant.errors import TransplantError, shorten

T = TypeVar("T")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_MAX_REFERENCE_DEPTH = 10
# Recipes hold names, paths and numbers: a few hundred values of at most a path's length. The caps refuse a
# YAML alias bomb ("billion laughs": nine lines that expand to 10^9 nodes) or a 50 MB string in one line,
# before anything walks or copies the tree.
MAX_RECIPE_NODES = 100_000
MAX_STRING_CHARS = 4096  # PATH_MAX
_MAX_INTERPOLATION_WORK = 1_000_000  # values visited plus characters made, for the whole recipe


# ---------------------------------------------------------------- words and assignments


def parse_bool(value: Any) -> bool:
    """A flag from a bool or an on/off word (`--set numbers=off`); anything else is a ValueError, so a typo
    such as `ture` is reported instead of read as False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")


def env_flag(name: str) -> bool:
    """Whether environment variable `name` is set to an on word (`HF_HUB_OFFLINE=1`); unset or any other word
    is off, since environment switches are read, not validated."""
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


def parse_assignment(text: str) -> tuple[str, Any]:
    """`--set train.steps=10` -> ("train.steps", 10). The value is read as YAML, so numbers, bools, lists and
    null arrive typed; the receiver (a recipe field, a method option) coerces it to what it declares."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise TransplantError(f"--set {shorten(text)!r} is not key=value; write it as --set "
                              f"{shorten(key or 'KEY', 40)}=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise TransplantError(f"--set {shorten(text)!r}: the value is not valid YAML; quote it, e.g. "
                              f"--set '{shorten(key, 40)}=\"...\"'") from None
    check_size(value, f"--set {shorten(key, 40)}")
    return key, value


def check_size(tree: Any, what: str) -> None:
    """Refuse a YAML value that would expand past `MAX_RECIPE_NODES` nodes (aliases count once per use: a
    shared subtree is measured once and multiplied, so a bomb is caught without expanding it) or that holds a
    string longer than `MAX_STRING_CHARS`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if isinstance(node, str) and len(node) > MAX_STRING_CHARS:
            raise TransplantError(f"{what} holds a string of {len(node):,} characters "
                                  f"({shorten(node, 40)!r}); recipe values are names and paths of at most "
                                  f"{MAX_STRING_CHARS}, shorten it")
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in open_nodes:
            raise TransplantError(f"{what} holds a YAML alias inside its own anchor (a value that contains "
                                  "itself); remove it")
        if id(node) not in sizes:
            open_nodes.add(id(node))
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            total = 1
            for child in children:
                total += size(child)
                if total > MAX_RECIPE_NODES:
                    raise TransplantError(f"{what} expands to more than {MAX_RECIPE_NODES:,} values (YAML "
                                          "aliases multiply them); a recipe needs a few hundred, remove the "
                                          "aliases")
            sizes[id(node)] = total
            open_nodes.discard(id(node))
        return sizes[id(node)]

    size(tree)


# ---------------------------------------------------------------- typing


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _union_members(hint: Any) -> tuple[list[Any], bool]:
    """(the non-None types of `hint`, whether None is allowed): `float | None` -> ([float], True)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (also through `X | None`), else None: such fields are sections to
    descend."""
    members, _ = _union_members(hint)
    return next((m for m in members if dataclasses.is_dataclass(m)), None)


def _type_name(hint: Any) -> str:
    members, nullable = _union_members(hint)
    names = [getattr(typing.get_origin(m) or m, "__name__", str(m)) for m in members]
    return " or ".join(names + (["null"] if nullable else []))


def _coerce_one(value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint` (one member of a union); a ValueError/TypeError when it does not fit."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{where} is a section")
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if hint is Any:
        return value
    if origin is bool:
        return parse_bool(value)
    if origin is int:
        if isinstance(value, bool):
            raise TypeError("a bool is not a number")
        number = (float(value) if isinstance(value, str)
                  and not value.strip().lstrip("+-").isdigit() else value)
        if isinstance(number, float) and not number.is_integer():
            raise ValueError("not a whole number")
        return int(number)
    if origin is float:
        if isinstance(value, bool):
            raise TypeError("a bool is not a number")
        return float(value)
    if origin is str:
        if isinstance(value, (dict, list)):
            raise TypeError("not a scalar")
        return str(value)
    if origin is list:
        if isinstance(value, dict):
            raise TypeError("a mapping is not a list")
        # `train: a.txt` is a list of one
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items)] if args else items
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError("not a mapping")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    return value


def _is_instance(value: Any, hint: Any) -> bool:
    kind = typing.get_origin(hint) or hint
    if kind is Any or not isinstance(kind, type) or (kind in (int, float) and isinstance(value, bool)):
        return False
    return isinstance(value, kind)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the declared type; a union takes the first member that fits (`dict | str`: a mapping or a
    path). Raises a one-line TransplantError naming the key, the value and the type."""
    members, nullable = _union_members(hint)
    if value is None:
        if nullable:
            return None
        raise TransplantError(f"recipe key {where} may not be null; give a {_type_name(hint)} or delete the "
                              "line")
    # a member the value already is goes first (so `corpus: notes.txt` stays a path in a `dict | str` field)
    for member in sorted(members, key=lambda m: not _is_instance(value, m)):
        try:
            return _coerce_one(value, member, where)
        except (TypeError, ValueError):
            continue
    section = _dataclass_of(hint)
    if section is not None:
        keys = ", ".join(f.name for f in dataclasses.fields(section))
        raise TransplantError(f"recipe key {where} must be a mapping of its keys ({keys}); fix the value")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise TransplantError(f"recipe key {where}={shown} is not a valid {_type_name(hint)}; fix the value")


def _unknown_key(key: str, where: str, fields: Iterable[str]) -> TransplantError:
    here = f"{where}.{key}" if where else key
    level = f"in {where}" if where else "at the top level"
    return TransplantError(f"unknown recipe key {here}; valid keys {level}: {', '.join(fields)}")


def _check_key(cls: type, dotted: str) -> None:
    """Reject a `--set` key the recipe class does not have, before it is set (so `train.steps.x=1` is called a
    wrong path, not a wrong value). Below a mapping-valued field (`loss.options`) any key goes."""
    parts = dotted.split(".")
    section: type = cls
    for depth, part in enumerate(parts):
        fields = _field_types(section)
        where = ".".join(parts[:depth])
        if part not in fields:
            raise _unknown_key(part, where, fields)
        inner = _dataclass_of(fields[part])
        if inner is None:
            members, _ = _union_members(fields[part])
            free_form = any(m is Any or (typing.get_origin(m) or m) is dict for m in members)
            if depth < len(parts) - 1 and not free_form:
                path = ".".join(parts[: depth + 1])
                raise TransplantError(f"--set {dotted}: {path} is a {_type_name(fields[part])}, not a "
                                      "section; "
                                      f"set {path}=VALUE instead")
            return
        section = inner


def _check_keys(cls: type, data: Mapping[str, Any], where: str = "") -> None:
    """Every key of `data` is a field of `cls`, section by section (as `_build` checks, without coercing)."""
    fields = _field_types(cls)
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise _unknown_key(unknown[0], where, fields)
    for key, value in data.items():
        section = _dataclass_of(fields[key])
        if section is not None and isinstance(value, dict):
            _check_keys(section, value, f"{where}.{key}" if where else key)


def _build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _unknown_key(str(unknown[0]), where, fields)
    values = {k: _coerce(v, fields[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**values)


# ---------------------------------------------------------------- trees


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            path = ".".join(keys[: depth + 1])
            raise TransplantError(f"--set {dotted}: {path} holds a value, not a section; set {path}=VALUE "
                                  "instead")
        node = child
    node[keys[-1]] = value


def _overlay(cls: type | None, base: dict, top: Mapping[str, Any]) -> dict:
    """`top` over `base`, descending only into dataclass sections: a dict-valued field (`loss.options`) is one
    value, replaced whole, so a default mapping never leaks keys into the user's."""
    fields = _field_types(cls) if cls is not None else {}
    out = dict(base)
    for key, value in top.items():
        section = _dataclass_of(fields[key]) if key in fields else None
        if section is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(section, out[key], value)
        else:
            out[key] = value
    return out


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise TransplantError(f"recipe reference ${{{dotted}}} names no key; fix the reference")
        node = node[key]
    return node


def _interpolate(node: Any, root: dict, depth: int = 0, budget: list[int] | None = None) -> Any:
    """`node` with every `${dotted.key}` replaced. `budget` counts the work (references followed, characters
    made) so values that reference each other ten times per level cannot grow 10^10-fold."""
    budget = [_MAX_INTERPOLATION_WORK] if budget is None else budget
    budget[0] -= 1
    if depth > _MAX_REFERENCE_DEPTH:
        raise TransplantError("recipe references ${...} refer to each other in a circle; fix them")
    if budget[0] < 0:
        raise TransplantError(f"recipe references ${{...}} expand to more than {_MAX_INTERPOLATION_WORK:,} "
                              "values or characters; fix them")
    if isinstance(node, dict):
        return {k: _interpolate(v, root, depth, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, root, depth, budget) for v in node]
    if isinstance(node, str) and "${" in node:
        whole = _REFERENCE.fullmatch(node)
        if whole:  # a bare reference keeps the referenced value's type
            return _interpolate(_lookup(root, whole.group(1)), root, depth + 1, budget)

        def resolve(match: re.Match) -> str:
            return str(_interpolate(_lookup(root, match.group(1)), root, depth + 1, budget))

        text = _REFERENCE.sub(resolve, node)
        budget[0] -= len(text)
        if len(text) > MAX_STRING_CHARS or budget[0] < 0:
            raise TransplantError(f"recipe references ${{...}} in {shorten(node, 40)!r} expand to more than "
                                  f"{MAX_STRING_CHARS} characters; fix them")
        return text
    return node


# ---------------------------------------------------------------- files


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as `line N: <problem>` (the context lines it quotes are dropped)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        return f"line {err.problem_mark.line + 1}: {' '.join((err.problem or 'invalid YAML').split())}"
    return " ".join(str(err).split())


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file, or a one-line error (missing, unreadable, not UTF-8, bad
    YAML)."""
    path = Path(path)
    if not path.is_file():
        raise TransplantError(f"recipe {path} does not exist or is not a file; pass a YAML file (see "
                              "recipes/)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise TransplantError(f"recipe {path} cannot be read ({err.strerror}); check its "
                              "permissions") from None
    except UnicodeDecodeError:
        raise TransplantError(f"recipe {path} is not UTF-8 text; pass a YAML file (see recipes/)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TransplantError(f"recipe {path} {_yaml_problem(err)}; fix the YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TransplantError(f"recipe {path} must hold `key: value` lines at the top level, not a "
                              f"{type(data).__name__}")
    check_size(data, f"recipe {path}")
    return data


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                data: Mapping[str, Any] | None = None) -> T:
    """A `cls` recipe from a YAML file and/or a mapping (`data`, laid over the file), then `--set` assignments
    (`overrides`, e.g. ["train.steps=10"]); `${...}` resolved, every key checked and every value typed.

    `cls` is a dataclass whose fields all have defaults; fields holding dataclasses are sections."""
    raw: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    if data:
        raw = _overlay(cls, raw, copy.deepcopy(dict(data)))
    merged = _overlay(cls, dataclasses.asdict(cls()), raw)
    # a `--set` changes one leaf of the merged recipe: `corpus.english=10` keeps the default's other entries
    for text in overrides:
        key, value = parse_assignment(text)
        _check_key(cls, key)
        _set_dotted(merged, key, value)
    _check_keys(cls, merged)  # a typo is named as such, before any reference under it is followed
    return _build(cls, _interpolate(merged, merged))


def recipe_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a recipe class accepts (`train.steps`, ...): what `--set` may name."""
    keys: list[str] = []
    for name, hint in _field_types(cls).items():
        section = _dataclass_of(hint)
        keys += recipe_keys(section, f"{prefix}{name}.") if section is not None else [f"{prefix}{name}"]
    return keys
