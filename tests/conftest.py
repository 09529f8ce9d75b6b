import os
import sys
from pathlib import Path

import pytest

# Tests are grouped by the part of vmtrace they check (format/, agent/, host/, report/,
# export/, clocksync/, lab/, e2e/, project/); what several of them share lives in
# support/, imported by module name.
sys.path.insert(0, str(Path(__file__).parent / "support"))

import realtrace  # noqa: E402

DATA = Path(__file__).parent / "data"

# Lab guests booted by the tests print kernel warnings too, so that a soft lockup seen in
# CI comes with its stack trace in the failing test's output (see lab.qemu.kernel_cmdline).
os.environ.setdefault("VMTRACE_GUEST_LOGLEVEL", "5")
# ...and every TCG guest, the benchmark's too, runs its vCPUs in one host thread: with a
# thread per vCPU a guest on a loaded CI host wedged while enabling tracepoints.
os.environ.setdefault("VMTRACE_TCG_THREAD", "single")


def pytest_collection_modifyitems(config, items):
    """Skip, with a reason, what cannot run here; CI (root, make test) runs it all."""
    no_tracefs = not realtrace.have_tracefs()
    no_oracle = not realtrace.have_trace_cmd()
    for item in items:
        if no_tracefs and "tracefs" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs root and tracefs"))
        if no_oracle and "oracle" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs trace-cmd (make test installs it)"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def real_trace(tmp_path_factory) -> Path:
    """One fresh v7 trace.dat of sched, timer and irq events, recorded for this run."""
    if not (realtrace.have_tracefs() and realtrace.have_trace_cmd()):
        pytest.skip("needs tracefs and trace-cmd")
    out = tmp_path_factory.mktemp("real") / "trace.dat"
    return realtrace.record_tracedat(out)
