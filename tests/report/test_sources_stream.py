"""`vmtrace report` reads the agent's `-o` stream directly (real agent, real tracefs)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmtrace.format.stream import unpack_stream
from vmtrace.tracefs import Tracefs

pytestmark = pytest.mark.tracefs


def vmtrace(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmtrace", *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    tf = Tracefs.create_instance(f"vmtrace-test-stream-{os.getpid()}")
    out = tmp_path_factory.mktemp("stream") / "agent.stream"
    try:
        tf.buffer_size_kb = 512
        tf.enable_events(["sched", "timer"])
        with open(out, "wb") as f:
            p = subprocess.Popen([sys.executable, "-m", "vmtrace", "agent", "--instance", tf.instance, "-o",
                                  "--start", "--no-kallsyms"], stdout=f, stderr=subprocess.PIPE)
            time.sleep(1.0)
            for i in range(200):
                tf.write("trace_marker", f"vmtrace-stream-test {i}")
            subprocess.run(["sh", "-c", "for i in 1 2 3 4 5; do ls / >/dev/null; sleep 0.01; done"])
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        tf.remove()
    return out


def test_report_of_stream_equals_report_of_unpacked_dir(stream: Path, tmp_path: Path):
    unpack_stream(str(stream), str(tmp_path / "raw"))
    direct = vmtrace("report", str(stream))
    via_dir = vmtrace("report", str(tmp_path / "raw"))
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == via_dir.stdout
    assert direct.stdout.count("vmtrace-stream-test") == 200


def test_stream_temp_dir_is_removed(stream: Path):
    import glob
    import tempfile

    import vmtrace

    pattern = os.path.join(tempfile.gettempdir(), "vmtrace-stream-*")
    before = set(glob.glob(pattern))
    trace = vmtrace.open(stream)
    assert sum(1 for _ in trace.events()) > 200
    trace.close()
    assert set(glob.glob(pattern)) == before


def test_truncated_stream_is_one_line_error(stream: Path, tmp_path: Path):
    cut = tmp_path / "cut.stream"
    data = stream.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 7])
    out = vmtrace("report", str(cut))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "cut.stream" in out.stderr
