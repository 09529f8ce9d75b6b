"""JSON lines and Parquet exports of a real trace, read back with json and DuckDB."""
from __future__ import annotations

import json

import pytest

import vmtrace
from vmtrace.export.jsonl import write_jsonl
from vmtrace.export.parquet import write_parquet, write_partitioned

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]


def test_jsonl_one_object_per_event(real_trace, tmp_path):
    out = tmp_path / "t.jsonl"
    with vmtrace.open(real_trace) as tr:
        n = write_jsonl(tr, out)
        stats = tr.stats()
        first_switch = next(e for e in tr.events(events=["sched:sched_switch"]) if e.kind == "event")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == n
    events = [r for r in rows if "event" in r]
    assert len(events) == stats["events"]
    assert sum(1 for r in rows if "lost" in r) == n - len(events)
    sw = next(r for r in events if r["event"] == "sched:sched_switch")
    assert (sw["ts"], sw["cpu"], sw["pid"], sw["fields"]) == \
        (first_switch.ts, first_switch.cpu, first_switch.pid, first_switch.fields)
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)


def test_parquet_timeline_and_partitions(real_trace, tmp_path):
    import duckdb
    with vmtrace.open(real_trace) as tr:
        rows = write_parquet(tr, tmp_path / "all.parquet")
        parts = write_partitioned(tr, tmp_path / "parts")
        stats = tr.stats()
        switches = [e for e in tr.events(events=["sched:sched_switch"]) if e.kind == "event"]
    assert rows == stats["events"] and parts == stats["per_event"]
    got = dict(duckdb.sql(f"select event, count(*) from '{tmp_path}/all.parquet' group by 1").fetchall())
    assert got == stats["per_event"]
    q = duckdb.sql(f"select ts, prev_comm, prev_state, next_pid from "
                   f"'{tmp_path}/parts/event=sched:sched_switch/part-0.parquet' order by ts, cpu")
    assert q.fetchall() == [(e.ts, e.fields["prev_comm"], e.fields["prev_state"],
                             e.fields["next_pid"]) for e in switches]
    total = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/parts/*/*.parquet', "
                       "union_by_name=true)").fetchall()[0][0]
    assert total == stats["events"]
