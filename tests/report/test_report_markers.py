"""trace_marker events against trace-cmd: the kernel splits at newlines and every event
text ends in one, which trace-cmd does not print (a blank line per marker otherwise)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import realtrace
from vmtrace.tracefs import Tracefs

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]

MARKERS = [b"one-nl\n", b"two-nl\n\n", b"no-nl", b"mid\nnl\n", b"x" * 300 + b"\n", "ünïcode\n".encode()]


@pytest.fixture(scope="module")
def marker_trace(tmp_path_factory) -> Path:
    name = f"vmtrace-test-markers-{os.getpid()}"
    tf = Tracefs.create_instance(name)
    out = tmp_path_factory.mktemp("markers") / "markers.dat"
    try:
        tf.tracing_on = True  # markers only, so every filter below keeps every line
        for m in MARKERS * 20:
            fd = os.open(tf.file("trace_marker"), os.O_WRONLY)
            try:
                os.write(fd, m)
            finally:
                os.close(fd)
        tf.tracing_on = False
        subprocess.run(["trace-cmd", "extract", "-B", name, "-o", str(out)], check=True,
                       capture_output=True, timeout=120)
    finally:
        tf.remove()
    return out


@pytest.mark.parametrize("args", [(), ("--events", "ftrace"), ("--cpu", "0,1")],
                         ids=["bulk", "filtered", "cpu"])
def test_markers_identical_to_trace_cmd(marker_trace: Path, args):
    want = realtrace.trace_cmd_report(marker_trace)
    got = subprocess.run([sys.executable, "-m", "vmtrace", "report", str(marker_trace), *args],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want
    # no blank line after a marker that ended in a single newline
    assert got.stdout.count("tracing_mark_write: one-nl\n") == 20
    assert "tracing_mark_write: one-nl\n\n" not in got.stdout
