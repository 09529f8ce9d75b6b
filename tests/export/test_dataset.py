"""`vmtrace export --dataset` and `vmtrace sql DATASET` on real sessions of this machine
(tests/support/fleetsessions.py: two "hosts", three sessions, four guests, one of them made to
lose events), checked against the sessions themselves read through vmtrace.open."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter

import pyarrow.parquet as pq
import pytest

import fleetsessions
from fleetsessions import doc_queries
from vmtrace import cli
from vmtrace.export import dataset as D
from vmtrace.session import SessionSource

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]




@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    return fleetsessions.fleet(tmp_path_factory.getbasetemp() / "fleet")


@pytest.fixture(scope="module")
def dataset(fleet, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "fleet"
    assert cli.main(["export", *map(str, fleet.values()), "--dataset", str(root), "-q"]) == 0
    return root


def _truth(fleet):
    """What each session holds, read through the Source: (host, guest) -> events."""
    hosts = {name: host for name, host, _g, _l in fleetsessions.FLEET}
    per = {}
    for name, d in fleet.items():
        with SessionSource(str(d)) as s:
            for src in s.source_names():
                per[(name, hosts[name], "host" if src == "host" else src)] = list(s.events(sources=[src]))
    return per


def test_layout_and_manifest(fleet, dataset):
    doc = json.loads((dataset / D.MANIFEST).read_text())
    assert doc["layout"] == "vmtrace-dataset" and doc["schema_version"] == D.SCHEMA_VERSION
    assert len(doc["sessions"]) == 3
    truth = _truth(fleet)
    files = sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*.parquet"))
    assert len(files) == len(truth) == 9
    for (name, host, guest), evs in truth.items():
        sid = next(k for k, s in doc["sessions"].items() if s["path"] == str(fleet[name]))
        entry = doc["sessions"][sid]["sources"][guest]
        assert entry["file"].startswith("host=%s/guest=%s/date=" % (host, guest))
        assert entry["file"] in files
        assert entry["rows"] == len(evs) > 0
        assert entry["ts_min"] == evs[0].ts and entry["ts_max"] == evs[-1].ts
        assert entry["lost_marks"] == sum(e.event == "lost_events" for e in evs)
    assert doc["hosts"]["hv1"]["sessions"] == 2 and doc["hosts"]["hv2"]["guests"] == ["g1", "g3", "host"]
    assert doc["rows"] == sum(len(v) for v in truth.values())


def test_rows_equal_the_sessions(fleet, dataset):
    """Every event, in order, with its typed columns equal to the decoded fields."""
    con = D.duckdb_connect(str(dataset))
    for (name, host, guest), evs in _truth(fleet).items():
        sid = D.session_id(str(fleet[name]), json.loads((fleet[name] / "session.json").read_text()))
        rows = con.execute("SELECT seq, ts, raw_ts, cpu, pid, comm, event, prev_pid, prev_state, next_pid, "
                           "next_comm, wake_pid, target_cpu, lost_count, fields FROM events "
                           "WHERE session = ? AND host = ? AND guest = ? ORDER BY seq", [sid, host, guest]).fetchall()
        assert len(rows) == len(evs)
        for r, e in zip(rows, evs):
            assert r[:7] == (r[0], e.ts, e.raw_ts, e.cpu, e.pid, e.comm, e.event)
            if e.event == "sched_switch":
                assert (r[7], r[8], r[9], r[10]) == (e.fields["prev_pid"], e.fields["prev_state"],
                                                     e.fields["next_pid"], e.fields["next_comm"])
            elif e.event in D.WAKE_EVENTS:
                assert (r[11], r[12]) == (e.fields["pid"], e.fields["target_cpu"]) and r[7] is None
            elif e.event == "lost_events":
                assert r[13] == e.fields["count"] and r[4] == -1
            else:
                assert r[7] is None and r[11] is None and r[13] is None
            assert set(r[14]) == set(e.fields)     # every field kept, typed or not
        assert [r[0] for r in rows] == list(range(len(evs)))


def test_lost_events_are_real_and_counted(fleet, dataset):
    truth = _truth(fleet)
    lost = [e for (n, h, g), evs in truth.items() for e in evs if e.event == "lost_events"]
    # the lossy guest's flood overwrote its 64 KB buffer: the kernel reported the drop
    # (with its size when the page had room for it, else as unknown: -1)
    assert lost and all(e.fields["count"] > 0 or e.fields["count"] == -1 for e in lost)
    r = D.duckdb_connect(str(dataset)).execute(doc_queries()["lost events per host"]).fetchall()
    assert r == [("hv2", len(lost), sum(max(e.fields["count"], 0) for e in lost),
                  sum(e.fields["count"] == -1 for e in lost))]


def test_events_per_guest_and_cpu_match_the_sessions(fleet, dataset):
    want = Counter()
    for (n, host, guest), evs in _truth(fleet).items():
        want.update((host, guest, e.cpu) for e in evs if e.event != "lost_events")
    got = D.duckdb_connect(str(dataset)).execute(doc_queries()["events per guest and CPU"]).fetchall()
    assert {(h, g, c): n for h, g, c, n in got} == dict(want)
    assert [r[:3] for r in got] == sorted(want)


def test_doc_queries_through_the_cli(dataset, capsys):
    qs = doc_queries()
    assert len(qs) == 5
    for title, q in qs.items():
        assert cli.main(["sql", str(dataset), "--format", "jsonl", "--", q]) == 0, title
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert rows, title
    # the views and the sessions table
    assert cli.main(["sql", str(dataset), "--format", "jsonl",
                     "SELECT (SELECT count(*) FROM sched_switch) AS a, "
                     "(SELECT count(*) FROM events WHERE event = 'sched_switch') AS b, "
                     "(SELECT count(*) FROM sessions) AS s, (SELECT sum(lost_count) FROM lost) AS l"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["a"] == r["b"] > 0 and r["s"] == 3 and r["l"] > 0


def test_p99_is_the_discrete_percentile(fleet, dataset):
    """p99_ns against a plain Python computation of the same definition on the sessions."""
    lat = Counter()
    per: dict = {}
    for (n, host, guest), evs in _truth(fleet).items():
        marks = []
        for i, e in enumerate(evs):
            if e.event in ("sched_wakeup", "sched_wakeup_new"):
                marks.append((e.fields["pid"], e.ts, 0, i))
            elif e.event == "sched_switch":
                marks.append((e.fields["next_pid"], e.ts, 1, i))
        marks.sort()
        for j, (pid, ts, k, _i) in enumerate(marks):
            if k:
                continue
            nxt = next((m for m in marks[j + 1:] if m[0] == pid and m[2] == 1), None)
            if nxt is not None:
                per.setdefault((host, guest), []).append(nxt[1] - ts)
                lat[(host, guest)] += 1
    got = D.duckdb_connect(str(dataset)).execute(doc_queries()["99th percentile of wake-up latency per guest"]).fetchall()
    assert {(h, g) for h, g, *_ in got} == set(per)
    for h, g, n, disc, cont in got:
        v = sorted(per[(h, g)])
        assert n == len(v)
        k = next(i for i in range(len(v)) if (i + 1) / len(v) >= 0.99)    # smallest with cum. share >= p
        assert disc == v[k]
        pos = (len(v) - 1) * 0.99
        lo = int(pos)
        assert cont == pytest.approx(v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo), rel=1e-12)


def test_row_groups_are_time_slices(fleet, tmp_path):
    root = tmp_path / "ds"
    assert cli.main(["export", str(fleet["hv1-a"]), "--dataset", str(root), "--slice", "10ms", "-q"]) == 0
    doc = D.read_manifest(str(root))
    (sid, s), = doc["sessions"].items()
    assert s["slice_ns"] == 10_000_000
    f = root / s["sources"]["g1"]["file"]
    md = pq.ParquetFile(f).metadata
    # the workload alone sleeps 40 x 2 ms and forks every 2 ms, traced from its first
    # milliseconds to its end: more than 70 ms of events, so 10 ms slices make at least 5
    assert md.num_row_groups == s["sources"]["g1"]["row_groups"] >= 5
    ts = md.schema.names.index("ts")
    bounds = [(md.row_group(i).column(ts).statistics.min, md.row_group(i).column(ts).statistics.max)
              for i in range(md.num_row_groups)]
    for lo, hi in bounds:
        assert lo // 10_000_000 == hi // 10_000_000             # one slice per group
    assert all(a[1] < b[0] for a, b in zip(bounds, bounds[1:]))  # disjoint, in order: prunable
    # a time filter reads only the groups that overlap it (pyarrow's row-group filter)
    lo, hi = bounds[1]
    frag = next(iter(__import__("pyarrow.dataset", fromlist=["dataset"]).dataset(str(f)).get_fragments()))
    import pyarrow.dataset as pads
    kept = frag.split_by_row_group(filter=(pads.field("ts") >= lo) & (pads.field("ts") <= hi))
    assert len(kept) == 1


def test_reexport_skips_and_replace_never_duplicates(fleet, tmp_path, capsys):
    root = tmp_path / "ds"
    one = str(fleet["hv1-a"])
    assert cli.main(["export", one, "--dataset", str(root), "-q"]) == 0
    capsys.readouterr()
    count = lambda: D.duckdb_connect(str(root)).execute("SELECT count(*) FROM events").fetchone()[0]  # noqa: E731
    n = count()
    assert cli.main(["export", one, one, "--dataset", str(root)]) == 0
    err = capsys.readouterr().err
    assert err.count("] skipped ") == 2 and "exported 0 sessions (2 skipped)" in err
    assert count() == n
    assert cli.main(["export", one, "--dataset", str(root), "--replace", "-q"]) == 0
    assert count() == n
    # replaced under another host: the old files go, the rows are there once
    assert cli.main(["export", one, "--dataset", str(root), "--replace", "--host", "hv9", "-q"]) == 0
    assert count() == n
    assert {p.name for p in root.iterdir() if p.is_dir()} == {"host=hv9"}
    assert not [p for p in root.rglob(".part-*")]


def test_progress_and_summary(fleet, tmp_path, capsys):
    assert cli.main(["export", str(fleet["hv2-a"]), "--dataset", str(tmp_path / "ds")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("vmtrace: [1/1] added ") and "host hv2" in err[0]
    doc = D.read_manifest(str(tmp_path / "ds"))
    (s,) = doc["sessions"].values()
    marks = sum(g["lost_marks"] for g in s["sources"].values())
    assert marks >= 1     # the lossy guest's flood, at least
    assert err[-1].startswith("vmtrace: exported 1 session (0 skipped), %d events and %d lost-events markers in "
                              % (s["rows"], marks))


def test_unknown_fields_are_kept_in_the_map(dataset):
    r = D.duckdb_connect(str(dataset)).execute(
        "SELECT count(*), count(fields['filename']) FROM events WHERE event = 'sched_process_exec'").fetchone()
    assert r[0] > 0 and r[1] == r[0]


# -- bad input ---------------------------------------------------------------------------
def _one_line_error(capsys, *args) -> str:
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmtrace: error: ") and err.count("\n") == 1, err
    return err


def test_refuses_a_directory_that_is_not_ours(fleet, tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    err = _one_line_error(capsys, "export", str(fleet["hv1-a"]), "--dataset", str(d))
    assert "not a vmtrace dataset" in err
    assert sorted(os.listdir(d)) == ["notes.txt"]
    _one_line_error(capsys, "sql", str(d), "SELECT 1")     # not a session either


def test_refuses_a_bad_or_newer_manifest(fleet, dataset, tmp_path, capsys):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    m = root / D.MANIFEST
    doc = json.loads(m.read_text())
    victim = tmp_path / "victim.parquet"
    victim.write_text("x")
    sid = next(iter(doc["sessions"]))
    doc["sessions"][sid]["sources"]["g1"]["file"] = "../victim.parquet"    # a replace would delete it
    m.write_text(json.dumps(doc))
    assert "bad file entry" in _one_line_error(capsys, "export", str(fleet["hv1-a"]), "--dataset", str(root),
                                               "--replace")
    assert victim.exists()
    doc = json.loads((dataset / D.MANIFEST).read_text())
    doc["schema_version"] = D.SCHEMA_VERSION + 1
    m.write_text(json.dumps(doc))
    assert "newer vmtrace" in _one_line_error(capsys, "sql", str(root), "SELECT 1")
    m.write_text("{" * 100000)
    assert "not JSON" in _one_line_error(capsys, "export", str(fleet["hv1-a"]), "--dataset", str(root))


def test_refuses_names_that_cannot_be_partitions(fleet, tmp_path, capsys):
    s = tmp_path / "s"
    shutil.copytree(fleet["hv1-a"], s)
    meta = json.loads((s / "session.json").read_text())
    meta["hostname"] = "../../etc"
    (s / "session.json").write_text(json.dumps(meta))
    err = _one_line_error(capsys, "export", str(s), "--dataset", str(tmp_path / "ds"))
    assert "host name" in err and "session.json" in err
    assert not (tmp_path / "ds").exists()      # refused before anything was made
    assert "no session.json" in _one_line_error(capsys, "export", str(tmp_path), "--dataset", str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()
    assert "host name" in _one_line_error(capsys, "export", str(s), "--dataset", str(tmp_path / "ds"),
                                          "--host", "a/b")
    assert "--date" in _one_line_error(capsys, "export", str(s), "--dataset", str(tmp_path / "ds"),
                                       "--host", "ok", "--date", "2026-1-1")
    assert "--slice" in _one_line_error(capsys, "export", str(s), "--dataset", str(tmp_path / "ds"),
                                        "--slice", "-3s")


def test_full_disk_leaves_the_dataset_readable(fleet, tmp_path, capsys):
    """A real full disk: the dataset on a small tmpfs, filled up after a first export."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        root = mnt / "ds"
        assert cli.main(["export", str(fleet["hv1-a"]), "--dataset", str(root), "-q"]) == 0
        q = "SELECT host, guest, count(*) FROM events GROUP BY ALL ORDER BY ALL"
        before = D.duckdb_connect(str(root)).execute(q).fetchall()
        manifest = (root / D.MANIFEST).read_bytes()
        capsys.readouterr()
        with open(mnt / "filler", "wb", buffering=0) as f:      # fill it to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
            try:
                while True:
                    f.write(b"\0" * 512)
            except OSError:
                pass
        err = _one_line_error(capsys, "export", str(fleet["hv2-a"]), "--dataset", str(root))
        assert "disk full" in err and "unchanged" in err
        assert (root / D.MANIFEST).read_bytes() == manifest
        assert D.duckdb_connect(str(root)).execute(q).fetchall() == before
        assert not [p for p in root.rglob(".part-*")]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_an_empty_dataset_answers_with_its_columns(tmp_path, capsys):
    root = tmp_path / "ds"
    root.mkdir()
    (root / D.MANIFEST).write_text(json.dumps(D.empty_manifest()))
    for q in doc_queries().values():
        assert cli.main(["sql", str(root), "--format", "jsonl", "--", q]) == 0
        assert capsys.readouterr().out == ""


def test_id_and_date_from_session_json(fleet, tmp_path):
    """A recorder that writes an ``id`` and a ``wall_clock`` anchor names the session and
    its day; without them the id is a digest and the day session.json's mtime."""
    s = tmp_path / "s"
    shutil.copytree(fleet["hv1-a"], s)
    meta = json.loads((s / "session.json").read_text())
    meta["id"] = "rec-0042"
    meta["wall_clock"] = {"mono_ns": 1, "realtime_ns": 1767225600 * 10**9 + 5}    # 2026-01-01T00:00:00Z
    (s / "session.json").write_text(json.dumps(meta))
    root = tmp_path / "ds"
    assert cli.main(["export", str(s), "--dataset", str(root), "-q"]) == 0
    doc = D.read_manifest(str(root))
    assert list(doc["sessions"]) == ["rec-0042"]
    assert doc["sessions"]["rec-0042"]["date"] == "2026-01-01"
    assert (root / "host=hv1" / "guest=g2" / "date=2026-01-01" / "part-rec-0042.parquet").is_file()
    meta["id"] = "../x"            # unusable as a file name: the digest names it instead
    (s / "session.json").write_text(json.dumps(meta))
    assert cli.main(["export", str(s), "--dataset", str(root), "-q"]) == 0
    assert sorted(D.read_manifest(str(root))["sessions"])[1].startswith("sha256-")
