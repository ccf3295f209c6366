"""The docs stay inside the repository: every file they cite exists, and every package names its modules.

A citation of a file that is not in the repository (an outside design note, a moved module) sends the next
reader nowhere; a package docstring that lists 6 of 9 modules hides the other 3. Both rot silently, so they
are checked here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "CONTRIBUTING.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
# distill/losses documents the loss contract; its losses are found through the registry.
PACKAGES_LISTING_MODULES = [
    p
    for p in sorted(ROOT.glob("*/**/__init__.py"))
    if p.parts[len(ROOT.parts)] in ("transplant", "distill", "hypernet") and p.parent.name != "losses"
]
# A path-like citation: dirs/file.ext with one of the project's own extensions.
CITED_PATH = re.compile(
    r"(?<![\w./-])((?:transplant|distill|hypernet|bench|tests|recipes|docs)/[\w./-]+"
    r"\.(?:py|md|yaml|json|sh))"
)


def _cited_paths(text: str) -> set[str]:
    """Paths named in `text`, except the `my_*` files of CONTRIBUTING's how-to examples."""
    return {m.rstrip(".") for m in CITED_PATH.findall(text) if not Path(m).name.startswith("my_")}


@pytest.mark.parametrize("doc", DOCS)
def test_cited_files_exist(doc):
    missing = sorted(p for p in _cited_paths((ROOT / doc).read_text()) if not (ROOT / p).exists())
    assert not missing, f"{doc} cites files that are not in the repository: {missing}"


def test_no_citation_of_an_outside_design_note():
    offenders = []
    for path in [*ROOT.glob("**/*.py"), *ROOT.glob("**/*.md")]:
        if ".venv" in path.parts or "egg-info" in str(path) or path == Path(__file__).resolve():
            continue
        if "DESIGN.md" in path.read_text(errors="replace"):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"cite docs/design.md instead of DESIGN.md in {offenders}"


def test_design_sections_cited_by_number_exist():
    headings = re.findall(r"^## (\d+)\. ", (ROOT / "docs/design.md").read_text(), flags=re.M)
    cited = set()
    sources = [
        *ROOT.glob("transplant/**/*.py"),
        *ROOT.glob("bench/*"),
        *ROOT.glob("*.md"),
        *ROOT.glob("docs/*"),
    ]
    for path in sources:
        if path.is_file():
            cited |= set(re.findall(r"design\.md\)? §(\d+)", path.read_text(errors="replace")))
    assert cited and cited <= set(headings), f"sections cited {sorted(cited)}, present {headings}"


@pytest.mark.parametrize("init", PACKAGES_LISTING_MODULES, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_package_docstring_lists_its_modules(init):
    docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
    modules = sorted(p.stem for p in init.parent.glob("*.py") if p.stem != "__init__")
    modules += sorted(p.name for p in init.parent.iterdir() if (p / "__init__.py").exists())
    unlisted = [m for m in modules if f"`{m}`" not in docstring]
    assert not unlisted, f"{init.relative_to(ROOT)}: docstring does not name {unlisted}"
