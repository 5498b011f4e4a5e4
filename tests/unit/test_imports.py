"""dpnb's import graph, read from the source with `ast`: the layering docs/design.md draws.

Every import of a dpnb module counts, wherever it is written: at the top of a module, inside a
function (a deferred import), or under `if TYPE_CHECKING:` (no run-time effect, but still a
dependency a reader follows). `from dpnb.x import y` is an edge to dpnb.x.y when y is a module, else
to dpnb.x. A package's `__init__` is a module of its own (`dpnb.privacy`); importing dpnb.x.y runs
dpnb.x's `__init__` first, which Python allows to import its children, so that is not an edge.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from testkit import REPO

PACKAGE = REPO / "dpnb"
STAGES = "dpnb.stages"

# Imports written inside a function, each with the reason it is not at the top of its module. A new
# one fails test_every_deferred_import_is_listed until it is listed here with its reason; one that is
# gone fails it too, so the list stays true.
DEFERRED = {
    ("dpnb.pipeline", "dpnb.stages.finetune"):
        "only under torchrun does the pipeline run a stage in its own process (the finetune stage, on every "
        "rank); at the top it would load the whole training stack for every dpnb command (measured +1.4 s)",
    ("dpnb.pipeline", "dpnb.stages.prepare"):
        "check_data, before a run that prepares: at the top it would load datasets and pandas for every dpnb "
        "command (measured +0.4 s)",
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # the most specific dpnb module the statement names
    line: int
    deferred: bool  # written inside a function


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The dpnb modules `name` imports: each import statement's targets, with its line and whether deferred."""
    found = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}:{child.lineno}: a relative import; dpnb imports by full name"
                targets = [f"{child.module}.{alias.name}" if f"{child.module}.{alias.name}" in modules
                           else child.module for alias in child.names]
            elif isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            else:
                targets = []
            for target in targets:
                if target in modules and target != name:
                    found.append(Import(name, target, child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return list(dict.fromkeys(found))  # one edge per target, whatever names a statement takes


def import_graph(package: Path = PACKAGE) -> list[Import]:
    modules = module_names(package)
    return [i for name, path in modules.items() for i in imports_of(name, path, modules)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """One cycle through each strongly connected part of the graph that has one (depth-first search)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    state: dict[str, str] = {}  # "open" while on the search path, "done" after
    path: list[str] = []
    found: list[list[str]] = []

    def search(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                search(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            search(node)
    return found


def is_stage(name: str) -> bool:
    return name.startswith(STAGES + ".")


def test_the_parser_sees_the_imports_it_must():
    # the graph is only as good as the parser: it finds imports at the top, in functions, under TYPE_CHECKING
    edges = {(i.importer, i.imported, i.deferred) for i in import_graph()}
    assert ("dpnb.stages.finetune", "dpnb.training.loop", False) in edges  # from dpnb.training.loop import train
    assert ("dpnb.stages.audit", "dpnb.training.loop", False) in edges  # from dpnb.training import loop
    assert ("dpnb.pipeline", "dpnb.stages.prepare", True) in edges  # inside check_inputs
    assert ("dpnb.training.checkpoints", "dpnb.training.dpsgd", False) in edges  # under TYPE_CHECKING
    assert ("dpnb.privacy", "dpnb.privacy.accounting", False) in edges  # a package's __init__


def test_no_stage_imports_another_stage():
    """A stage module holds run_stage, its steps and its notebook's views; what two stages share is an engine."""
    crossing = [f"{i.importer} imports {i.imported} (line {i.line})" for i in import_graph()
                if is_stage(i.importer) and is_stage(i.imported)]
    assert crossing == []


def test_no_engine_imports_a_stage():
    """Only the run machinery (pipeline, for torchrun and the checks before a run) may load a stage module."""
    upward = [f"{i.importer} imports {i.imported} (line {i.line})" for i in import_graph()
              if is_stage(i.imported) and not is_stage(i.importer) and i.importer != "dpnb.pipeline"]
    assert upward == []


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_deferred_import_is_listed_with_its_reason():
    deferred = {(i.importer, i.imported) for i in import_graph() if i.deferred}
    assert deferred == set(DEFERRED)
    assert all(reason.strip() for reason in DEFERRED.values())


def test_no_dpnb_module_is_imported_by_a_name_built_at_run_time():
    """importlib.import_module("dpnb...") would hide an edge from the graph above."""
    hidden = []
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("import_module", "__import__")):
                if node.args and "dpnb" in ast.unparse(node.args[0]):
                    hidden.append(f"{name}:{node.lineno}")
    assert hidden == []


def test_the_cycle_search_finds_a_cycle():
    # the check above passes on dpnb's graph, so it is shown to catch a cycle on one that has it
    edges = [Import("a", "b", 1, False), Import("b", "c", 1, True), Import("c", "a", 1, False),
             Import("c", "d", 2, False)]
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles(edges[:2] + edges[3:]) == []
