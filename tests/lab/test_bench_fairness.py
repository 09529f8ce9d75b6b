"""The fairness spinner of `bench overhead`: SCHED_IDLE busy loops that start, stay on
their CPU, and are gone after stop; and the in-guest runner's plan and script."""
import os
import time

import pytest

from vmtrace.bench import guest, overhead


def _policy(pid):
    return os.sched_getscheduler(pid)


def test_spinner_runs_at_sched_idle_on_its_cpu_and_stops():
    cpus = sorted(os.sched_getaffinity(0))
    target = cpus[-1]
    sp = overhead.IdleSpinner([target]).start()
    try:
        assert sp.running() and len(sp.pids) == 1
        pid = sp.pids[0]
        deadline = time.monotonic() + 10
        # the policy is set between fork and exec, so it holds from the first instruction
        assert _policy(pid) == os.SCHED_IDLE
        assert os.sched_getaffinity(pid) == {target}
        first = sp.cpu_seconds()
        while sp.cpu_seconds() <= first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sp.cpu_seconds() > first, "the spinner never ran"
        d = sp.describe()
        assert d["enabled"] is True and d["cpus"] == [target] and d["policy"] == "SCHED_IDLE"
    finally:
        sp.stop()
    assert not sp.running() and sp.pids == []
    assert not os.path.exists("/proc/%d" % pid) or open("/proc/%d/stat" % pid).read().split()[2] == "Z"
    assert sp.cpu_seconds() is None


def test_spinner_as_context_manager_cleans_up():
    with overhead.IdleSpinner([sorted(os.sched_getaffinity(0))[0]]) as sp:
        pid = sp.pids[0]
        assert sp.running()
    assert not os.path.exists("/proc/%d/cmdline" % pid) or not sp.running()


def test_cpu_pressure_is_read_when_the_kernel_has_psi():
    v = overhead.cpu_pressure_total()
    if not os.path.exists("/proc/pressure/cpu"):
        assert v is None
    else:
        assert isinstance(v, int) and v >= 0


def test_guest_plan_rotates_collectors_between_repetitions():
    cfg = overhead.Config(seconds=1.5, reps=3, workloads=("pingpong",))
    plan = guest.plan_runs(cfg, ["off", "native", "vmtrace"])
    orders = [[c for c, _w, _s in plan[i:i + 3]] for i in range(0, 9, 3)]
    assert orders == [["off", "native", "vmtrace"], ["native", "vmtrace", "off"], ["vmtrace", "off", "native"]]
    assert {s for _c, _w, s in plan} == {1.5}


def test_guest_script_has_one_run_per_plan_entry_and_the_spinner_switch():
    cfg = overhead.Config(seconds=2, reps=1, workloads=("intloop",))
    plan = guest.plan_runs(cfg, ["native", "text"])
    script = guest.guest_script(plan, cfg)
    assert script.count("\nrun_one ") == 2 and "run_one native intloop 2" in script
    assert "SCHED_IDLE" in script and "taskset -c 0" in script
    cfg.spinner = False
    assert "SCHED_IDLE" not in guest.guest_script(plan, cfg)


def test_guest_end_lines_are_parsed():
    e = guest._parse_end("VMTRACE-BENCH END vmtrace pingpong ok score=5125.3 lost=0 unread=12 cpu=0.41")
    assert e == {"collector": "vmtrace", "workload": "pingpong", "ok": True, "score": "5125.3", "lost": "0",
                 "unread": "12", "cpu": "0.41"}
    assert guest._parse_end("VMTRACE-BENCH END copy intloop fail")["ok"] is False
    assert guest._parse_end("VMTRACE-BENCH BEGIN copy intloop") is None
