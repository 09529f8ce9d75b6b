"""`vmtrace bench overhead --scenario`: the loads that real guests have, and the measures
that do not drown in noise (events lost, own-activity share, CPU per 100 MB)."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from vmtrace.bench import overhead
from vmtrace.lab import peers


def _allowed(pid: int) -> str:
    for line in open("/proc/%d/status" % pid):
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return ""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to move between")
def test_a_moving_workload_visits_every_cpu():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    proc = subprocess.Popen([str(peers.build("pingpong")), "2"], stdout=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}))
    stop = threading.Event()
    mover = threading.Thread(target=overhead._keep_moving, args=(proc.pid, cpus, cpus[0], stop), daemon=True)
    mover.start()
    seen = set()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        seen.add(_allowed(proc.pid))
        # the echo child moves with its parent
        kids = open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)).read().split()
        for k in kids:
            seen.add(_allowed(int(k)))
        time.sleep(0.05)
    stop.set()
    mover.join(5)
    proc.wait(30)
    assert {str(c) for c in cpus} <= seen, seen


def _run(tmp_path, scenario):
    proc = subprocess.run([sys.executable, "-m", "vmtrace", "bench", "overhead", "--workload", "pingpong",
                           "--collector", "vmtrace", "--seconds", "0.5", "--reps", "1", "--scenario", scenario,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((tmp_path / "overhead.json").read_text()), proc.stdout


@pytest.mark.tracefs
@pytest.mark.slow
@pytest.mark.parametrize("scenario,policy", [("busy", "SCHED_OTHER"), ("moving", "SCHED_IDLE")])
def test_scenarios_run_and_measure_the_agent_itself(tmp_path, scenario, policy):
    doc, out = _run(tmp_path, scenario)
    assert doc["params"]["scenario"]["name"] == scenario
    if len(os.sched_getaffinity(0)) > 1:
        assert doc["params"]["idle_spinner"]["policy"] == policy
    agent = doc["workloads"]["pingpong"]["collectors"]["vmtrace"]
    run = agent["runs"][0]
    assert run["bytes"] > 0 and run["cpu_per_100mb"] > 0
    # decoded: the agent's own threads' events are counted, and with its defaults they
    # are a small part (the ones written before its filter was in place, and sched)
    assert run["own_share"] is not None and 0 <= run["own_share"] < 0.2, run
    assert "own events" in out and "CPU s/100MB" in out


def test_unknown_scenario_is_refused():
    with pytest.raises(Exception, match="unknown scenario"):
        overhead.run(overhead.Config(scenario="nope"))
