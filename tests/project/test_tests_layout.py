"""The test tree keeps its own rules (docs/internals.md, "Where the tests are"): every
test module sits in the directory of the part it checks, and none imports another
test module; what tests share lives in tests/support/."""
from __future__ import annotations

import ast

from paths import TESTS

PARTS = {"format", "agent", "host", "report", "export", "clocksync", "lab", "e2e", "project"}


def _test_modules():
    return sorted(TESTS.rglob("test_*.py"))


def test_every_test_module_is_in_a_part_directory():
    misplaced = [str(p.relative_to(TESTS)) for p in _test_modules()
                 if p.parent.parent != TESTS or p.parent.name not in PARTS]
    assert not misplaced, "test modules outside tests/<part>/: %s" % misplaced


def _test_imports(source: str) -> list:
    """Names of test modules that ``source`` imports (absolute imports only)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        out += [n for n in names if n.split(".")[-1].startswith("test_")]
    return out


def test_no_test_module_imports_another():
    offenders = ["%s imports %s" % (p.relative_to(TESTS), n)
                 for p in _test_modules() for n in _test_imports(p.read_text())]
    assert not offenders, offenders


def test_the_checker_sees_both_import_forms():
    src = "import os\nimport test_api as t\ndef f():\n    from test_agent import inst\nfrom pages import LAYOUT\n"
    assert _test_imports(src) == ["test_api", "test_agent"]
