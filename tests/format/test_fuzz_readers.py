"""A short coverage-guided fuzz run of each reader (tests/support/fuzz_readers.py, atheris).

A few seconds per target with a fixed seed, so a run is repeatable; the long run is in
docs/security.md. A target that raises anything but a VmtraceError fails here with
libFuzzer's report of the input (it prints the crashing input in hex and base64).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from paths import SUPPORT

pytest.importorskip("atheris")



@pytest.mark.slow
@pytest.mark.parametrize("target", ["tracedat", "rawdir", "metadata", "format", "printfmt"])
def test_fuzz_target_finds_no_crash(target, tmp_path):
    p = subprocess.run([sys.executable, str(SUPPORT / "fuzz_readers.py"), target, "-seed=1",
                        "-max_total_time=4", "-rss_limit_mb=1024", "-timeout=10"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    tail = p.stderr[-3000:]
    assert p.returncode == 0, tail
    assert "Done " in p.stderr and " runs in " in p.stderr, tail
    assert not list(tmp_path.glob("crash-*")), tail
