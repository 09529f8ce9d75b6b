"""`vmtrace bench` on the command line: errors are one line, smoke run has every collector."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from vmtrace.bench import collectors

VMTRACE = [sys.executable, "-m", "vmtrace"]


def _run(*args, timeout=120):
    return subprocess.run([*VMTRACE, *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmtrace: error: ")
    return lines[0]


def test_decode_of_a_missing_file_is_one_line(tmp_path):
    line = _one_line_error(_run("bench", "decode", str(tmp_path / "nope.dat")))
    assert "no such file" in line


@pytest.mark.slow
def test_drain_is_wired_into_the_same_output(tmp_path):
    if importlib.util.find_spec("vmtrace.bench.drain") is None:
        assert "not available yet" in _one_line_error(_run("bench", "drain"))
        return
    proc = _run("bench", "drain", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "drain.json").read_text())
    assert doc["benchmark"] == "drain" and doc["machine"]["cpus"] >= 1
    assert doc["command"].startswith("vmtrace bench drain --quick")
    assert (tmp_path / "drain.png").read_bytes()[:4] == b"\x89PNG"
    for peer in doc["results"]:
        assert peer in proc.stdout


@pytest.mark.vm
@pytest.mark.slow
def test_guest_quick_overhead_smoke(tmp_path):
    """`--guest --quick` boots the TCG guest once and brings back a score per collector."""
    import shutil
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86 (make test installs it)")
    proc = _run("bench", "overhead", "--guest", "--quick", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "overhead.json").read_text())
    assert doc["setting"] == "guest" and doc["params"]["guest"]["accel"] == "tcg"
    assert doc["params"]["guest"]["vcpus"] == 2 and doc["params"]["idle_spinner"]["enabled"] is True
    cols = doc["workloads"]["pingpong"]["collectors"]
    # every collector ran, or says why not; none is silently missing
    assert set(cols) | set(doc["skipped"]) == set(collectors.NAMES)
    assert {"off", "native"} <= set(cols)
    for name, entry in cols.items():
        assert len(entry["scores"]) == 2 and all(s > 0 for s in entry["scores"]), name
        if name not in ("off", "native"):
            # the bytes arrived on the host through the virtio-serial FIFOs
            assert entry["bytes"]["min"] > 0, name
            assert entry["cpu_seconds"]["max"] > 0, name
    assert "(guest)" in proc.stdout


@pytest.mark.tracefs
def test_no_spinner_is_recorded(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    proc = _run("bench", "overhead", "--workload", "pingpong", "--collector", "native", "--seconds", "0.3",
                "--reps", "1", "--no-spinner", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "overhead.json").read_text())
    assert doc["params"]["idle_spinner"]["enabled"] is False
    assert doc["workloads"]["pingpong"]["collectors"]["native"]["runs"][0]["spinner_share"] is None


def test_bad_reps_is_one_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert "--reps" in _one_line_error(_run("bench", "overhead", "--reps", "0", "--out", str(tmp_path)))


@pytest.mark.tracefs
@pytest.mark.slow
def test_quick_overhead_smoke(tmp_path):
    """What CI runs: every collector appears with a positive score, readers move bytes."""
    before = {n for n in os.listdir("/sys/kernel/tracing/instances") if n.startswith("vmtrace-bench-")}
    proc = _run("bench", "overhead", "--quick", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "overhead.json").read_text())
    assert (tmp_path / "overhead.png").read_bytes()[:4] == b"\x89PNG"
    agent_there = importlib.util.find_spec("vmtrace.commands.agent") is not None
    # a collector may only be skipped when its code has not landed, never silently
    assert set(doc["skipped"]) <= (set() if agent_there else {"vmtrace"})
    expected = set(collectors.NAMES) - set(doc["skipped"])
    assert doc["params"]["quick"] is True and doc["params"]["reps"] == 2
    spin = doc["params"]["idle_spinner"]
    if len(os.sched_getaffinity(0)) > 1:
        # on by default, on every CPU but the workload's, and measured in every run
        assert spin["enabled"] is True and spin["policy"] == "SCHED_IDLE"
        assert doc["params"]["workload_cpu"] not in spin["cpus"] and spin["cpus"]
        for w in doc["workloads"].values():
            for entry in w["collectors"].values():
                assert all(r["spinner_share"] is not None and r["spinner_share"] >= 0 for r in entry["runs"])
        # no spinner outlives the benchmark
        for pid in spin["pids"]:
            assert not os.path.exists("/proc/%d" % pid) or "while True" not in open("/proc/%d/cmdline" % pid).read()
    for wname, w in doc["workloads"].items():
        cols = w["collectors"]
        assert set(cols) == expected
        for name, entry in cols.items():
            assert len(entry["scores"]) == 2
            assert all(s > 0 for s in entry["scores"]), (wname, name)
            assert entry["lost"]["min"] >= 0
            if name in ("off", "native"):
                assert entry["bytes"] is None and entry["cpu_seconds"] is None
            else:
                assert entry["bytes"]["min"] > 0, (wname, name)
                assert entry["cpu_seconds"]["min"] >= 0
            if name != "native":
                assert entry["overhead_pct"]["median"] is not None
        assert cols["off"]["lost"]["max"] == 0
    table_rows = [line for line in proc.stdout.splitlines() if "│" in line]
    for name in expected:
        assert any(f" {name} " in row for row in table_rows), name
    # the tracefs instance is gone afterwards
    after = {n for n in os.listdir("/sys/kernel/tracing/instances") if n.startswith("vmtrace-bench-")}
    assert after <= before


@pytest.mark.oracle
def test_decode_is_wired_into_the_same_output(tmp_path, data_dir):
    trace = data_dir / "tracedat_small_v7.dat"
    if importlib.util.find_spec("vmtrace.bench.decode") is None or not trace.exists():
        pytest.skip("decoder benchmark or fixture not there")
    proc = _run("bench", "decode", str(trace), "--reps", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "decode.json").read_text())
    assert doc["benchmark"] == "decode" and doc["results"]
    assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"
    for peer in doc["results"]:
        assert peer in proc.stdout
