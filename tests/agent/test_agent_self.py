"""The agent keeps its own threads out of the recording, places its pumps where they
do not compete with the user's work, and can run them at real-time priority.

The first and last run the real agent on this machine's tracefs in a private instance;
the placement arithmetic is checked on a constructed /proc and on real tasks.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


from agentproc import agent, finish
from vmtrace.agent import placement
from vmtrace.lab import peers
from vmtrace.tracefs import EVENT_NOTRACE_PID

MARK = "vmtrace-test agent ready"


def _tids(pid: int) -> set:
    return {int(t) for t in os.listdir("/proc/%d/task" % pid)}


def _wait_open(pid: int, paths, timeout: float = 20.0) -> None:
    want = {os.path.realpath(p) for p in paths}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = set()
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                have.add(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
            except OSError:
                pass
        if want <= have:
            return
        time.sleep(0.02)
    raise AssertionError("the agent never opened %s" % sorted(want))


def _record(inst, tmp_path, *extra):  # noqa: F811
    """Run the agent around a pingpong burst; return (events after the agent was ready,
    by (pid, event), the agent's thread ids, its stderr).

    "After ready" is by the trace clock (``mono``, read here just before the burst), not
    by a marker event: on a loaded machine the ring buffer may overwrite its oldest
    pages, the marker's among them, and the events dropped are counted, not kept.
    """
    import vmtrace

    inst.enable_events(["sched", "kmem", "timer"])
    inst.clock = "mono"
    out = tmp_path / ("raw" + "".join(extra).replace("-", ""))
    p = agent("--instance", inst.instance, "--output-dir", str(out), "--start", "--flush-interval", "0.2", *extra)
    try:
        _wait_open(p.pid, [inst.trace_pipe_raw(c) for c in inst.cpus()])
        time.sleep(0.3)
        tids = _tids(p.pid)
        ready = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        with open(inst.file("trace_marker"), "w") as f:
            f.write(MARK)
        subprocess.run([str(peers.build("pingpong")), "0.5"], check=True, capture_output=True, timeout=60)
        time.sleep(0.5)
    finally:
        err = finish(p, signal.SIGINT)
    events = [e for e in vmtrace.open(str(out)).events() if e.kind == "event" and e.ts >= ready]
    return Counter((e.pid in tids, e.event) for e in events), tids, err


def _filter(inst, event: str) -> str:  # noqa: F811
    return inst.read("events/%s/filter" % event.replace(":", "/")).strip()


def test_own_threads_are_kept_out_and_the_filters_are_restored(inst, tmp_path):  # noqa: F811
    inst.write("events/kmem/kmalloc/filter", "bytes_req > 0")      # a user's own filter, to be kept
    seen, tids, err = _record(inst, tmp_path)
    ours = {ev: n for (mine, ev), n in seen.items() if mine}
    theirs = sum(n for (mine, _), n in seen.items() if not mine)
    assert theirs > 1000, seen
    assert seen[(False, "kmem:kmalloc")] > 0, seen                 # the user's filter still let events in
    # Left for the user to see: when the agent's threads ran (sched). Gone: their page
    # moves, allocations and timers.
    assert all(ev.startswith("sched:") for ev in ours), ours
    assert _filter(inst, "kmem:kmalloc") == "bytes_req > 0"
    assert _filter(inst, "kmem:kfree") == "none" and _filter(inst, "timer:hrtimer_start") == "none"
    assert inst.pid_list(EVENT_NOTRACE_PID) == [], "a pid list costs every context switch (selffilter.py)"
    assert "cpu" in err


def test_trace_self_records_the_agent_too(inst, tmp_path):  # noqa: F811
    seen, tids, _ = _record(inst, tmp_path, "--trace-self")
    own_kmem = sum(n for (mine, ev), n in seen.items() if mine and not ev.startswith("sched:"))
    assert own_kmem > 0, seen           # every page it takes allocates one for the ring buffer
    assert _filter(inst, "kmem:kfree") == "none"


def test_pid_exclusion_expressions():
    from vmtrace.agent.selffilter import pid_exclusion
    assert pid_exclusion([7]) == "common_pid != 7"
    assert pid_exclusion([12, 10, 11, 20]) == "(common_pid < 10 || common_pid > 12) && common_pid != 20"


def test_self_filter_refused_by_the_kernel_is_reported_not_raised(inst):  # noqa: F811
    from vmtrace.agent.selffilter import SelfFilter
    f = SelfFilter(inst, [os.getpid()])
    problems = f.apply(["kmem:no_such_event", "sched:sched_switch", "timer:hrtimer_start"])
    assert len(problems) == 1 and "no_such_event" in problems[0]
    assert _filter(inst, "timer:hrtimer_start") == "common_pid != %d" % os.getpid()
    assert _filter(inst, "sched:sched_switch") == "none"            # sched stays visible
    assert f.restore() == [] and _filter(inst, "timer:hrtimer_start") == "none"


def test_pump_priority_sets_sched_fifo(inst, tmp_path):  # noqa: F811
    p = agent("--instance", inst.instance, "--output-dir", str(tmp_path / "raw"), "--start",
              "--pump-priority", "fifo:3")
    try:
        _wait_open(p.pid, [inst.trace_pipe_raw(c) for c in inst.cpus()])
        # the pipes may be open before every pump thread has started: wait for them all
        deadline = time.monotonic() + 30
        while True:
            policies = {}
            for tid in _tids(p.pid):
                try:
                    stat = Path("/proc/%d/task/%d/stat" % (p.pid, tid)).read_bytes()
                except FileNotFoundError:
                    continue
                fields = stat[stat.rfind(b")") + 2:].split()
                policies[tid] = (int(fields[38]), int(fields[37]))   # policy, rt_priority
            fifo = [t for t, v in policies.items() if v == (os.SCHED_FIFO, 3)]
            if len(fifo) >= len(inst.cpus()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        err = finish(p, signal.SIGINT)
    # the main thread (tid == pid) keeps normal scheduling; one pump per CPU runs at
    # SCHED_FIFO 3 (other helper threads, if any, keep normal scheduling)
    assert policies.pop(p.pid) == (0, 0), err
    fifo = [t for t, v in policies.items() if v == (os.SCHED_FIFO, 3)]
    assert len(fifo) == len(inst.cpus()), (policies, err)
    assert all(v in ((os.SCHED_FIFO, 3), (0, 0)) for v in policies.values()), (policies, err)


def test_bad_pump_priority_is_one_line():
    p = agent("--pump-priority", "rr:5")
    err = finish_err(p)
    assert err.strip().splitlines() == ["vmtrace-agent: error: --pump-priority 'rr:5': use fifo:N with N from 1 to 99"]


def finish_err(p: subprocess.Popen) -> str:
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2
    return err.decode()


# -- placement ----------------------------------------------------------------------------

def _fake_task(root: Path, pid: int, tid: int, ticks: int, nice: int, cpu: int, policy: int,
               comm: str = "a (b) c") -> None:
    d = root / str(pid) / "task" / str(tid)
    d.mkdir(parents=True, exist_ok=True)
    # fields from 3 on: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice ... processor(39) rt_priority policy
    rest = ["S"] + ["0"] * 10 + [str(ticks), "0", "0", "0", "20", str(nice)] + ["0"] * 19 + [str(cpu), "0", str(policy)]
    (d / "stat").write_text("%d (%s) %s\n" % (tid, comm, " ".join(rest)))


def test_low_priority_tasks_and_discount_on_a_constructed_proc(tmp_path):
    _fake_task(tmp_path, 10, 10, 100, 0, 1, placement.SCHED_IDLE_POLICY)      # batch job, SCHED_IDLE
    _fake_task(tmp_path, 11, 11, 100, 19, 1, 0)                              # nice 19
    _fake_task(tmp_path, 12, 12, 100, 0, 0, 0)                               # real work
    _fake_task(tmp_path, 99, 100, 50, -10, 1, 0)                             # our own pump
    paths = placement.low_priority_tasks(99, str(tmp_path))
    assert sorted(Path(p).parent.name for p in paths) == ["10", "100", "11"]
    assert placement.task_sample(str(tmp_path / "10/task/10/stat")) == (100, 0, 1, placement.SCHED_IDLE_POLICY)
    d = placement.Discount(99, str(tmp_path))
    assert d.take() == {}                          # the first call only sets the baseline
    _fake_task(tmp_path, 10, 10, 150, 0, 1, placement.SCHED_IDLE_POLICY)
    _fake_task(tmp_path, 99, 100, 60, -10, 1, 0)
    _fake_task(tmp_path, 12, 12, 180, 0, 0, 0)
    assert d.take() == {1: 60}                     # 50 of the batch job + 10 of ours; not the real work
    # CPU 1 was fully busy, but only with work that yields: it counts as idle
    busy = placement.busy_fraction({0: (0, 0), 1: (0, 0)}, {0: (80, 100), 1: (60, 100)}, {1: 60})
    assert busy == {0: 0.8, 1: 0.0}
    assert placement.least_busy(busy, [0, 1]) == [1]


def test_a_real_sched_idle_task_is_discounted():
    spin = subprocess.Popen([sys.executable, "-c",
                             "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
                             "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 30: pass"])
    normal = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sample = placement.task_sample("/proc/%d/task/%d/stat" % (spin.pid, spin.pid))
            if sample and sample[3] == placement.SCHED_IDLE_POLICY:
                break
            time.sleep(0.02)
        paths = placement.low_priority_tasks(os.getpid())
        assert "/proc/%d/task/%d/stat" % (spin.pid, spin.pid) in paths
        assert "/proc/%d/task/%d/stat" % (normal.pid, normal.pid) not in paths
        assert "/proc/%d/task/%d/stat" % (os.getpid(), os.getpid()) in paths      # ourselves
    finally:
        spin.kill()
        normal.kill()
        spin.wait()
        normal.wait()


def test_a_pump_avoids_the_cpu_it_drains():
    assert placement.away_from(0, [0, 1]) == [1]
    assert placement.away_from(1, [0, 1]) == [0]
    assert placement.away_from(1, [1]) == [1]           # nowhere else allowed
    assert placement.away_from(2, [0, 1]) == [0, 1]
