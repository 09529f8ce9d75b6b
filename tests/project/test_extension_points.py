"""Adding an export, a clock-sync method or a plugin is one new file: each test writes
such a file (outside the source tree), makes it visible the way a file in the package
would be, and checks the existing code picks it up with nothing else changed.
(Plugins: tests/format/test_plugins.py adds a per-event-only plugin; transports:
tests/host/test_transport.py registers a toy transport.)"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

import vmtrace.export as export_pkg
from vmtrace import cli

TOY_EXPORT = '''
"""A toy export: one line per event, its name only."""
from vmtrace.export import Export

FORMAT = Export("toynames", "event names, one per line", needs_file=True)


def write(source, out, selection):
    n = 0
    with open(out, "w") as f:
        for ev in source.events(**selection.kwargs()):
            if getattr(ev, "kind", "event") == "event":
                f.write(ev.event + "\\n")
                n += 1
    return "wrote %d names to %s" % (n, out)
'''


@pytest.fixture
def toy_export(tmp_path, monkeypatch):
    pkg = tmp_path / "more_exports"
    pkg.mkdir()
    (pkg / "toynames.py").write_text(TOY_EXPORT)
    # a file in vmtrace/export/ is found through the package's __path__
    monkeypatch.setattr(export_pkg, "__path__", list(export_pkg.__path__) + [str(pkg)])
    monkeypatch.setattr(export_pkg, "_registry", None)
    sys.modules.pop("vmtrace.export.toynames", None)
    sys.modules.pop("vmtrace.commands.report", None)   # --format choices are read at import
    yield
    sys.modules.pop("vmtrace.export.toynames", None)
    sys.modules.pop("vmtrace.commands.report", None)
    export_pkg._registry = None


def test_a_new_export_is_one_file(toy_export, data_dir, tmp_path, capsys):
    assert "toynames" in export_pkg.registry()
    out = tmp_path / "names.txt"
    assert cli.main(["report", str(data_dir / "tracedat_small_v7.dat"), "--format", "toynames",
                     "-o", str(out), "--events", "sched"]) == 0
    names = out.read_text().split()
    assert names
    assert all(n.startswith("sched:") for n in names)
    assert "wrote %d names" % len(names) in capsys.readouterr().err
    assert cli.main(["report", str(data_dir / "tracedat_small_v7.dat"), "--format", "toynames"]) == 2
    assert "needs -o FILE" in capsys.readouterr().err


TOY_METHOD = '''
"""A toy clock-sync method: the guest's clock is the host's plus a fixed second."""
import numpy as np
from vmtrace.clocksync import SyncReport


class Shift:
    method = "toy"

    def to_host(self, ts, cpu=None):
        return np.asarray(ts, dtype=np.int64) - 1_000_000_000

    def shifted(self, delta_ns):
        raise NotImplementedError


def build(session, name):
    return Shift(), SyncReport(method="toy", notes=["a fixed second"])
'''


@pytest.mark.tracefs
@pytest.mark.oracle
def test_a_new_clock_method_is_one_file_and_a_table_line(tmp_path, monkeypatch):
    from pseudosession import make_pseudo_session
    from vmtrace import clocksync
    from vmtrace.session import SessionSource

    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "toy_clock_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(mod_dir))
    monkeypatch.setitem(clocksync.METHODS, "toy", "toy_clock_method")
    sess = make_pseudo_session(tmp_path / "s", n_probes=4)
    doc = json.loads((sess / "session.json").read_text())
    doc["guests"]["guest1"]["sync"] = {"method": "toy"}
    (sess / "session.json").write_text(json.dumps(doc))
    with SessionSource(str(sess)) as src:
        mapped = [e for e in src.events(sources=["guest1"])][:50]
        raw = [e.raw_ts for e in mapped]
        assert mapped and all(e.ts == r - 1_000_000_000 for e, r in zip(mapped, raw))
        assert src.session.reports["guest1"].method == "toy"
    importlib.invalidate_caches()
