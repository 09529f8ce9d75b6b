"""`vmtrace check` end to end on a real two-clock session (see support/pseudosession.py).

Until the project's decoder (vmtrace.api) is installed the session's trace.dat files are
read with the trace-cmd oracle instead; the test says which through `reader`.
"""
from __future__ import annotations

import json

import pytest

import pseudosession as ps
from vmtrace import cli, merge

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    return ps.make_pseudo_session(tmp_path_factory.mktemp("chk") / "sess", n_probes=30)


@pytest.fixture(autouse=True)
def _reader(monkeypatch):
    try:
        import vmtrace.api  # noqa: F401
    except ImportError:
        monkeypatch.setattr(merge, "default_reader", ps.tracecmd_events)


def test_check_passes(session_dir, capsys):
    assert cli.main(["check", str(session_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "0 violations"
    assert "guest1: 30 probes" in out[0] and "sync error" in out[0] and "hold-out: 0 violations on 15" in out[0]


def test_check_fails_on_a_wrong_offset(session_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", str(session_dir), "--skew-ns", "-300000"])
    assert exc.value.code == 1
    out = capsys.readouterr().out.splitlines()
    n = int(out[-1].split()[0])
    assert n >= 30 + 15
    assert any("violation: guest1: probe seq=" in line for line in out)


def test_check_json(session_dir, capsys):
    assert cli.main(["check", str(session_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    g = res["guests"]["guest1"]
    assert res["violations"] == 0 and g["probes_checked"] == 30 and g["method"] == "ptp"
    assert 0 < g["error_ns"] < 50_000


def test_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmtrace: error:") and "session.json" in err[0]
    assert cli.main(["check", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _with_sync(session_dir, tmp_path, sync):
    import shutil
    d = tmp_path / "s"
    shutil.copytree(session_dir, d)
    meta = json.loads((d / "session.json").read_text())
    name = next(iter(meta["guests"]))
    meta["guests"][name]["sync"] = sync
    (d / "session.json").write_text(json.dumps(meta))
    (d / "host-vcpus.txt").write_text("")
    return d, name


def test_tcg_sync_on_another_clock_falls_back_with_a_note(session_dir, tmp_path, capsys):
    d, name = _with_sync(session_dir, tmp_path, {"method": "tcg", "vcpu_threads": {"0": 4242},
                                                 "file": "host-vcpus.txt", "anchors": []})
    assert cli.main(["check", str(d)]) == 0
    out = capsys.readouterr().out
    assert "method ptp" in out and "tcg sync not used (guest traced with" in out


def test_malformed_tcg_sync_is_one_error_line(session_dir, tmp_path, capsys):
    for bad in ({"method": "tcg", "vcpu_threads": {"0": -5}, "file": "host-vcpus.txt"},
                {"method": "tcg", "vcpu_threads": {"0": 5}, "file": "../etc/passwd"},
                {"method": "tcg", "vcpu_threads": {"0": 5}, "file": "host-vcpus.txt", "anchors": [[1, 9, 2]]}):
        d, name = _with_sync(session_dir, tmp_path / str(len(str(bad))), bad)
        assert cli.main(["check", str(d)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vmtrace: error:") and name in err[0], err
