"""format/ is pure: bytes in, events and text out (docs/internals.md).

It must not reach for the live system, the CLI or the layers built on top of it, or a
decoder would start depending on the machine it runs on, and it must have no import
cycle among its own modules, so each can be read and tested on its own. Checked on the
source with ``ast``: every import counts, including those inside functions (which run
only on some paths and would escape a test that merely imports the package).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

import vmtrace.format

FORMAT_DIR = Path(vmtrace.format.__file__).parent
PACKAGE = "vmtrace.format"

FORBIDDEN = ("vmtrace.tracefs", "vmtrace.host", "vmtrace.agent", "vmtrace.commands",
             "vmtrace.export", "vmtrace.api", "vmtrace.sources", "vmtrace.merge",
             "vmtrace.lab", "vmtrace.bench", "click", "rich")


def _modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module under format/ (packages by __init__.py)."""
    out = {}
    for path in sorted(FORMAT_DIR.rglob("*.py")):
        parts = path.relative_to(FORMAT_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PACKAGE,) + parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(tree: ast.AST, module: str, is_package: bool,
             top_level_only: bool = False) -> Iterator[Tuple[str, Tuple[str, ...], int]]:
    """(module imported, names taken from it, line) for each import in ``tree``.

    Relative imports are resolved against ``module``; ``importlib.import_module`` and
    ``__import__`` of a literal name count too. With ``top_level_only`` the imports that
    run when the module is first imported are given: those outside any function body.
    """
    base = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST, in_function: bool) -> Iterator[Tuple[str, Tuple[str, ...], int]]:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if top_level_only and inner:
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, (), child.lineno
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parent = base[:len(base) - (child.level - 1)]
                    target = ".".join(parent + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                yield target, tuple(a.name for a in child.names), child.lineno
            elif isinstance(child, ast.Call) and child.args \
                    and isinstance(child.args[0], ast.Constant) \
                    and isinstance(child.args[0].value, str) \
                    and (getattr(child.func, "attr", None) == "import_module"
                         or getattr(child.func, "id", None) in ("import_module", "__import__")):
                yield child.args[0].value, (), child.lineno
            yield from visit(child, inner)

    yield from visit(tree, False)


def _forbidden(target: str, names: Tuple[str, ...]) -> List[str]:
    """The forbidden modules an import reaches (``from vmtrace import api`` reaches api)."""
    def bad(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    if bad(target):
        return [target]
    return [f"{target}.{n}" for n in names if bad(f"{target}.{n}")]


def _parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_format_imports_nothing_from_the_layers_above_it():
    bad = []
    for module, path in _modules().items():
        for target, names, line in _imports(_parse(path), module, _is_package(path)):
            for hit in _forbidden(target, names):
                bad.append(f"{path.relative_to(FORMAT_DIR.parent)}:{line}: imports {hit}")
    assert not bad, "format/ must stay pure:\n" + "\n".join(bad)


def _graph() -> Dict[str, Set[str]]:
    """Module-level import edges between format/ modules.

    ``from P import N`` is an edge to ``P.N`` when that is a module, else to ``P``;
    importing a submodule is not counted as importing its package's ``__init__``
    (Python runs it, but a package that imports its own submodules is not a cycle).
    """
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(_parse(path), module, _is_package(path),
                                         top_level_only=True):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if subs:
                graph[module].update(subs)
            if len(subs) < len(names) or not names:
                if target in modules:
                    graph[module].add(target)
        graph[module].discard(module)
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` (as a path that returns to its start), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def dfs(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return []


def test_no_import_cycle_inside_format():
    graph = _graph()
    # the graph is really read: these edges exist today
    assert "vmtrace.format.fastmerge" in graph["vmtrace.format.fastrender"]
    assert "vmtrace.format.printfmt.cexpr" in graph["vmtrace.format.printfmt.codegen"]
    assert "vmtrace.format.columns" in graph["vmtrace.format.events"]
    cycle = _cycle(graph)
    assert not cycle, "import cycle in format/: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, reached", [
    ("def f():\n    from vmtrace.tracefs import kallsyms\n", ["vmtrace.tracefs"]),
    ("import click\n", ["click"]),
    ("from vmtrace import api, errors\n", ["vmtrace.api"]),
    ("from .. import sources\n", ["vmtrace.sources"]),
    ("import importlib\nm = importlib.import_module('vmtrace.host.recording')\n",
     ["vmtrace.host.recording"]),
    ("from vmtrace.errors import FormatError\nimport numpy\n", []),
])
def test_the_checker_sees_every_kind_of_import(source, reached):
    hits = [h for target, names, _ in _imports(ast.parse(source), "vmtrace.format.x", False)
            for h in _forbidden(target, names)]
    assert hits == reached


def test_the_cycle_finder_counts_module_level_imports_and_finds_a_cycle():
    tree = ast.parse("import vmtrace.format.b\ndef f():\n    import vmtrace.format.c\n")
    top = [t for t, _, _ in _imports(tree, "vmtrace.format.a", False, top_level_only=True)]
    assert top == ["vmtrace.format.b"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
