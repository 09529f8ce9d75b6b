"""Parquet export of a real two-clock session and `vmtrace sql` over it, including the
worked queries of docs/timeline.md (read from the page, so the docs stay runnable)."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest

import pseudosession as ps
from paths import ROOT
from vmtrace import cli
from vmtrace import session as merge
from vmtrace.export import session_parquet

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]
DOC = ROOT / "docs" / "timeline.md"


@pytest.fixture(autouse=True)
def _reader(monkeypatch):
    try:
        import vmtrace.api  # noqa: F401
    except ImportError:
        monkeypatch.setattr(merge, "default_reader", ps.tracecmd_events)


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    return ps.make_pseudo_session(tmp_path_factory.mktemp("sql") / "sess", n_probes=20)


def test_parquet_partitions_and_counts(session_dir, tmp_path):
    src = merge.SessionSource(str(session_dir))
    s = src.session
    files = session_parquet.write_session_parquet(src, str(tmp_path / "pq"))
    assert (tmp_path / "pq" / "_SUCCESS").exists()
    parts = {(Path(f).parent.parent.name, Path(f).parent.name) for f in files}
    want = {("source=%s" % e.source, "cpu=%d" % e.cpu) for e in s.merged()}
    assert parts == want
    # pyarrow reads it back with the partition columns, every event survived
    t = ds.dataset(str(tmp_path / "pq"), format="parquet", partitioning="hive").to_table()
    counts = {}
    for e in s.merged():
        counts[(e.source, e.cpu)] = counts.get((e.source, e.cpu), 0) + 1
    got = {}
    for src, cpu in zip(t.column("source").to_pylist(), t.column("cpu").to_pylist()):
        got[(src, int(cpu))] = got.get((src, int(cpu)), 0) + 1
    assert got == counts
    # duckdb: same rows, and the timestamps are the merged (host clock) ones
    con = duckdb.connect()
    n, lo = con.execute("SELECT count(*), min(ts) FROM read_parquet('%s/**/*.parquet', hive_partitioning=true)"
                        % (tmp_path / "pq")).fetchone()
    first = next(iter(s.merged()))
    assert n == sum(counts.values()) and lo == first.ts


def test_sql_command_table_csv_jsonl(session_dir, capsys):
    q = "SELECT source, count(*) AS n FROM events GROUP BY source ORDER BY source"
    assert cli.main(["sql", str(session_dir), q]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["source", "n"] and out[-1] == "(2 rows)"
    assert cli.main(["sql", str(session_dir), q, "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["source", "n"] and [r[0] for r in rows[1:]] == ["guest1", "host"]
    assert cli.main(["sql", str(session_dir), q, "--format", "jsonl"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["n"] > 0 for r in recs)
    assert (session_dir / "parquet" / "_SUCCESS").exists()


def _doc_queries():
    text = DOC.read_text()
    return re.findall(r"```sql\n(.*?)```", text, re.S)


def test_worked_queries_from_the_docs(session_dir, capsys):
    queries = [q for q in _doc_queries() if "CREATE TABLE" not in q]   # the Trino DDL is not DuckDB
    assert len(queries) >= 4
    results = []
    for q in queries:
        assert cli.main(["sql", str(session_dir), q, "--format", "jsonl"]) == 0, q
        results.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    busiest = next(r for q, r in zip(queries, results) if "cpu_ms" in q)
    assert {r["source"] for r in busiest} == {"guest1", "host"}
    assert all(r["cpu_ms"] > 0 and r["pid"] != 0 for r in busiest)
    lat = next(r for q, r in zip(queries, results) if "p99_us" in q)
    assert {r["source"] for r in lat} == {"guest1", "host"}
    for r in lat:
        assert 0 <= r["p50_us"] <= r["p90_us"] <= r["p99_us"] and r["wakeups"] > 0
    during = next(r for q, r in zip(queries, results) if "vmtrace-probe" in q)
    assert during and during[0]["guest"] == "guest1"


def test_sql_errors_are_one_line(session_dir, tmp_path, capsys):
    assert cli.main(["sql", str(session_dir), "SELECT nope FROM events"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vmtrace: error: sql:")
    assert cli.main(["sql", str(tmp_path), "SELECT 1"]) == 2
    assert "session.json" in capsys.readouterr().err
