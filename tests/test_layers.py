"""The architecture, checked: every module imports only its own layer or the layers below, and nothing loops.

Imports are read from the source (module level and inside functions alike: a lazy import is still a
dependency), so the test needs no optional package installed. docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("transplant", "distill", "hypernet")

# Lowest first. A module belongs to the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("transplant.errors", "transplant.cache", "transplant.dtypes", "transplant.version", "transplant.recipes",
     "transplant.options"),
    ("transplant.solvers",),
    ("transplant.tokenizers",),
    ("transplant.assets",),
    ("transplant.io",),
    ("transplant.init",),
    ("transplant.eval",),
    ("transplant.pipeline", "transplant.extend", "transplant"),
    ("distill",),
    ("hypernet",),  # above distill: it trains on the distillation trainer's runtime, checkpoints and loading
    ("cli_helpers",),  # click and the launcher glue the three command lines share
    ("cli",),
]
# Siblings on one layer that must not import each other.
SEPARATE: list[tuple[str, str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = {"cli": ROOT / "cli.py", "cli_helpers": ROOT / "cli_helpers.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[_module_name(path)] = path
    return files


MODULES = _sources()


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (a submodule if it is one, else its package), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is on no layer: add it to LAYERS here and to docs/architecture.md")
    return best


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_module_is_on_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_or_sideways(module):
    own = _layer(module)
    upward = sorted(target for target in GRAPH[module] if _layer(target) > own)
    assert not upward, f"{module} (layer {own}) imports a higher layer: {upward}"
    for a, b in SEPARATE:
        if _top(module) == a:
            assert not [t for t in GRAPH[module] if _top(t) == b], f"{module} imports {b}"
        if _top(module) == b:
            assert not [t for t in GRAPH[module] if _top(t) == a], f"{module} imports {a}"


def test_transplant_never_imports_distill_or_hypernet():
    offenders = {m: sorted(t for t in GRAPH[m] if _top(t) in ("distill", "hypernet"))
                 for m in MODULES if _top(m) == "transplant"}
    assert not {m: t for m, t in offenders.items() if t}


def _third_party_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_command_line_knows_click():
    """The libraries take recipe objects and raise TransplantError; parsing argv, click and the launcher glue
    are `cli`'s (and its helpers', which only `cli` imports)."""
    offenders = {m: sorted(_third_party_imports(p) & {"click", "cli", "cli_helpers"})
                 for m, p in MODULES.items() if _top(m) in PACKAGES}
    assert not {m: names for m, names in offenders.items() if names}
    assert [m for m, targets in GRAPH.items() if "cli_helpers" in targets] == ["cli"]


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph; a package importing its own submodules
    (its `__init__` re-exporting them) is not a loop, so edges from a package into itself are left out."""
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_lazy_imports(tmp_path):
    """The walker must count an import inside a function, or a lazy loop would pass unnoticed."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from transplant.pipeline import transplant\n")
    assert _imports("transplant.tokenizers.mod", source) == {"transplant.pipeline"}


def test_importing_one_method_registers_only_that_method():
    import subprocess
    import sys

    code = ("import transplant.init.fvt, transplant.init.registry as r; "
            "print(sorted(r.METHODS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['fvt']"


def test_a_plain_transplant_from_a_gguf_never_imports_deepspeed(tiny_pair, tmp_path):
    """Issue 25: DeepSpeed is the trainer's. A transplant (here from a GGUF base, whose conversion saves
    through transformers, where accelerate looks for DeepSpeed engines) must not import it: seconds of import
    and an accelerator warning in a command that never trains."""
    import json
    import os
    import subprocess
    import sys

    from transplant.io.gguf_export import export_gguf

    base_gguf = tmp_path / "base" / "base.gguf"
    base_gguf.parent.mkdir()
    export_gguf(tiny_pair["base_tied"], base_gguf, outtype="f32")
    script = ("import json, sys, transplant; "
              "transplant.transplant(sys.argv[1], sys.argv[2], method='fvt', output=sys.argv[3], "
              "eval_texts=None); "
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')))")
    env = {**os.environ, "TOKENTRANSPLANT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(base_gguf), str(tiny_pair["donor_tok"]),
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert "Setting accelerator" not in done.stderr


def test_every_top_level_module_is_installed():
    """The console scripts import `cli`, which imports its siblings: a root module missing from pyproject's
    `py-modules` works under pytest (the repo root is on sys.path) and fails in a user's installed
    `transplant` with ModuleNotFoundError (it did: `cli_train`)."""
    import re

    root = Path(__file__).resolve().parent.parent
    line = re.search(r"^py-modules = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M).group(1)
    listed = set(re.findall(r'"([^"]+)"', line))  # (tomllib is 3.11+; the project supports 3.10)
    assert {p.stem for p in root.glob("*.py")} <= listed
