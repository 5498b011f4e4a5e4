"""README.md and docs/: a first screen of at most about 12 KB; links, modules and files named that exist.

The README holds the first screen and links to docs/ for reference (issue 20); these checks keep the
links and the names they cite true as files and modules move.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from testkit import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 12_500  # "at most about 12 KB"

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
DOTTED = re.compile(r"`(dpnb(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")  # `dpnb.a.b...` in code spans
REPO_PATH = re.compile(r"`((?:dpnb|tests|benchmarks|configs|notebooks)/[^`\s*]*)[`\s:]")  # `dpnb/io.py`, no globs


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {heading_anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    return broken


def defined_names(source: Path) -> set[str]:
    """Top-level functions, classes and assigned names of a module, read without importing it."""
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def resolves(dotted: str) -> bool:
    """`dpnb.a.b.c` names a module (file or package) and then at most one top-level name in it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if module.exists():
            rest = parts[cut:]
            return not rest or (len(rest) <= 2 and rest[0] in defined_names(module))
    return False


def test_readme_is_a_first_screen_of_at_most_about_12_kb():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move reference into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_readme_and_docs_links_resolve(page):
    assert broken_links(page) == []


def test_readme_links_every_page_in_docs():
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(README.read_text(encoding="utf-8"))}
    assert {page.name for page in DOCS} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_readme_and_docs_name_only_modules_that_exist(page):
    named = set(DOTTED.findall(page.read_text(encoding="utf-8")))
    assert sorted(name for name in named if not resolves(name)) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_readme_and_docs_name_only_files_that_exist(page):
    missing = []
    for named in set(REPO_PATH.findall(page.read_text(encoding="utf-8"))):
        path, _, test = named.partition("::")  # tests/x.py::test_name[ROW]
        test = test.split("[")[0]
        if not (REPO / path).exists() or (test and test not in defined_names(REPO / path)):
            missing.append(named)
    assert sorted(missing) == []
