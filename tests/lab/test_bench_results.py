"""Result documents: summaries per collector, JSON, Markdown, table and PNG files."""
import json

import pytest

from vmtrace.bench import overhead, results
from vmtrace.errors import VmtraceError
from vmtrace.tracefs import CpuStats


def _run(score, cpu=None, nbytes=None, lost=0):
    return {"score": score, "cpu_seconds": cpu, "bytes": nbytes, "lost": lost,
            "lost_reported": None, "unread": 0, "note": ""}


def _doc():
    runs = {
        "off": [_run(200.0), _run(210.0)],
        "native": [_run(100.0, lost=500), _run(110.0, lost=700)],
        "seedlike": [_run(95.0, 0.1, 4096, 10), _run(99.0, 0.2, 8192, 30)],
    }
    return {
        "benchmark": "overhead", "setting": "host",
        "params": {"seconds": 1.0, "reps": 2, "collectors": ["off", "native", "seedlike"]},
        "workloads": {"pingpong": {"unit": "round trips/s", "collectors": overhead.summarize_workload(runs)}},
    }


def test_summarize_workload_against_native():
    cols = _doc()["workloads"]["pingpong"]["collectors"]
    assert cols["native"]["overhead_pct"]["median"] == pytest.approx(0.0)
    seed = cols["seedlike"]
    assert seed["score"]["median"] == pytest.approx(97.0)
    assert seed["overhead_pct"]["median"] == pytest.approx((1 - 97 / 105) * 100)
    assert seed["overhead_pct"]["min"] == pytest.approx(5.0)            # 95 vs 100
    assert seed["overhead_pct"]["max"] == pytest.approx((1 - 99 / 110) * 100)
    assert seed["bytes"]["median"] == 6144
    assert seed["lost"]["max"] == 30
    # collectors without a process have no CPU time or bytes, rather than a fake zero
    assert cols["off"]["cpu_seconds"] is None and cols["off"]["bytes"] is None
    assert cols["off"]["overhead_pct"]["median"] == pytest.approx((1 - 205 / 105) * 100)


def test_summarize_without_native_has_no_overhead():
    cols = overhead.summarize_workload({"off": [_run(1.0)]})
    assert cols["off"]["overhead_pct"] is None


def test_ring_lost_sums_overrun_and_dropped_deltas():
    before = {0: CpuStats(overrun=10, dropped_events=1), 1: CpuStats()}
    after = {0: CpuStats(overrun=25, dropped_events=3), 1: CpuStats(overrun=7)}
    assert overhead.ring_lost(before, after) == 15 + 2 + 7


def test_json_round_trip(tmp_path):
    doc = results.attach_context(_doc(), ["bench", "overhead", "--quick"])
    path = results.write_json(doc, tmp_path / "deep" / "dir", "overhead")
    assert path.name == "overhead.json"
    back = results.read_json(path)
    assert back == json.loads(json.dumps(doc))
    assert back["command"] == "vmtrace bench overhead --quick"
    assert back["machine"]["cpus"] >= 1 and back["machine"]["kernel"]


def test_read_json_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    with pytest.raises(VmtraceError, match="not a vmtrace benchmark result"):
        results.read_json(bad)
    bad.write_text("{oops")
    with pytest.raises(VmtraceError, match="not a JSON result file"):
        results.read_json(bad)


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        results.write_json({"benchmark": "x", "v": float("nan")}, tmp_path, "x")


def test_markdown_and_table_list_every_collector_in_order():
    doc = _doc()
    md = results.overhead_markdown(doc)
    lines = md.strip().splitlines()
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["off", "native", "seedlike"]
    assert "reference" in lines[3]
    assert "+7.6 %" in lines[4]          # (1 - 97/105) * 100
    assert "6.1 kB" in lines[4]

    from rich.console import Console
    con = Console(width=200, record=True)
    con.print(results.overhead_table(doc))
    text = con.export_text()
    for name in ("off", "native", "seedlike"):
        assert name in text


def test_png_is_written(tmp_path):
    path = results.overhead_png(_doc(), tmp_path / "overhead.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_of_empty_document_is_an_error(tmp_path):
    with pytest.raises(VmtraceError, match="nothing to plot"):
        results.overhead_png({"benchmark": "overhead", "workloads": {}}, tmp_path / "x.png")


def test_formatting_helpers():
    assert results.fmt_bytes(None) == "-"
    assert results.fmt_bytes(512) == "512 B"
    assert results.fmt_bytes(1_500_000) == "1.5 MB"
    assert results.fmt_overhead({"median": 3.25, "min": 1.0, "max": 5.0}) == "+3.2 % [+1.0..+5.0]"
    assert results.fmt_overhead(None) == "-"


def test_generic_documents_for_decode_and_drain(tmp_path):
    doc = {"benchmark": "decode", "results": {
        "trace-cmd report": {"samples": [2.0, 2.5, 3.0], "events": 1000},
        "vmtrace columns": {"samples": [0.5, 0.4, 0.6], "events": 1000},
    }}
    rows = results.generic_rows(doc)
    assert list(rows) == ["trace-cmd report", "vmtrace columns"]
    from rich.console import Console
    con = Console(width=200, record=True)
    con.print(results.generic_table(doc, "decode"))
    text = con.export_text()
    assert "2.500 [2.000..3.000]" in text and "vmtrace columns" in text
    png = results.generic_png(doc, tmp_path / "decode.png", "decode")
    assert png is not None and png.stat().st_size > 0
    assert results.generic_png({"a": {"x": 1}}, tmp_path / "none.png", "t") is None
