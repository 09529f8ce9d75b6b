"""The tree's import arrows run one way: a layer imports only layers below it, and no
module imports itself back through others, counting imports inside functions (which
only hide an arrow, they do not remove it). Imports under ``if TYPE_CHECKING:`` are for
annotations and do not count.

The layers, bottom up (docs/internals.md draws them):

    errors
    values, protocol, tracefs, merge     checks, wire formats, tracefs, the k-way merge
    format, clocksync, agent             pure decoding; clock maps; the guest agent
    sources, text, host, tables          opening files; trace-cmd text; the recorder; Arrow schemas
    api                                  a single trace (Trace)
    seeddir, session                     a seed agent's files; a merged session
    source                               vmtrace.open(): any input as a Source
    vmtrace (package)                    vmtrace.open
    export                               output formats, each one file
    lab                                  the test guest, peers and the demo
    bench                                benchmarks
    commands, cli, __main__              the command line
"""
from __future__ import annotations

import ast
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set
from paths import ROOT as CHECKOUT

ROOT = CHECKOUT / "src" / "vmtrace"

RANK = {
    "errors": 0,
    "values": 1, "protocol": 1, "tracefs": 1, "merge": 1,
    "format": 2, "clocksync": 2, "agent": 2,
    "sources": 3, "text": 3, "host": 3, "tables": 3,
    "api": 4,
    "seeddir": 5, "session": 5,
    "source": 6,
    "vmtrace": 7,
    "export": 8,
    "lab": 9,
    "bench": 10,
    "commands": 11, "cli": 12, "__main__": 13,
}


def _modules() -> Dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(mods: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> vmtrace modules it imports anywhere in its body."""
    edges: Dict[str, Set[str]] = defaultdict(set)
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = {id(n) for t in ast.walk(tree) if _is_type_checking(t) for n in ast.walk(t)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [target + "." + a.name for a in node.names if target + "." + a.name in mods]
                # "from vmtrace import protocol" is an arrow to the module, not the package
                targets = subs if subs and len(subs) == len(node.names) else [target] + subs
            else:
                continue
            edges[mod].update(t for t in targets if t in mods and t != mod)
    return edges


def unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "vmtrace"


def test_every_unit_has_a_layer():
    units = {unit(m) for m in _modules()}
    assert units <= set(RANK), sorted(units - set(RANK))


def test_imports_only_go_down():
    mods = _modules()
    bad = []
    for a, targets in imports(mods).items():
        for b in targets:
            ua, ub = unit(a), unit(b)
            if ua != ub and RANK[ub] >= RANK[ua]:
                bad.append("%s (%s) imports %s (%s)" % (a, ua, b, ub))
    assert not bad, "\n".join(sorted(bad))


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:          # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_anywhere():
    assert _cycles(imports(_modules())) == []


def test_the_checker_sees_what_it_must():
    """The scan is not vacuous: known arrows are found, a cycle and an upward arrow
    are recognised."""
    edges = imports(_modules())
    assert "vmtrace.protocol" in edges["vmtrace.agent.core"]
    assert "vmtrace.source" in edges["vmtrace.commands.report"]
    assert "vmtrace.session" in edges["vmtrace.source"]          # inside a function
    assert "vmtrace.agent.core" not in edges["vmtrace.agent.control"]   # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
