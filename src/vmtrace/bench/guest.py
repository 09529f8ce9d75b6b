"""The overhead benchmark inside the lab guest, through real virtio-serial ports.

This is the seed's own setting (seeds/002): the workload runs in a guest pinned to
vCPU0, ftrace records sched+timer+kmem into the guest's ring buffer, and a collector
moves the data out through the virtio-serial ports ``trace-path-cpuN`` to FIFOs on
the host, where simple reader threads drain and count it. The guest is booted once
(TCG, 2 vCPUs) and one generated shell script runs every (workload, repetition,
collector) in the order the host decided, rotated from one repetition to the next as
on the host.

Every collector that moves data writes it to the ports, so all of them pay for the
same path out of the guest:

* ``vmtrace``: the agent zipapp from the image, ``--start --pump-cpus 1``, ports found
  by name (the host holds the control port open but sends no orders);
* ``seedlike``: the reference C agent compiled static; its OUTDIR holds symlinks
  ``cpuN -> /dev/vportXpY`` so its per-CPU output files *are* the ports (the 2012 agent);
* ``copy``: the same naive read/write copy as on the host (one Python process per CPU),
  writing to the CPU's port: the seed's "virtio-serial (normal)" method;
* ``text``: ``cat trace_pipe`` into the port of CPU 0.

Per run the guest reports the score, the ring buffer's lost events (``overrun`` +
``dropped events`` deltas), and the collector's CPU seconds from busybox ``time``
(wait4 of the collector, threads and shutdown included). Bytes moved are counted on
the host: the bytes that arrived between this run's BEGIN line on the console and the
next one. The fairness spinner of the host benchmark runs on vCPU1 here too.
"""
from __future__ import annotations

import os
import select
import shlex
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from vmtrace.bench import collectors as coll
from vmtrace.bench import overhead as ov
from vmtrace.lab import peers
from vmtrace.errors import VmtraceError

TAG = "VMTRACE-BENCH"
GUEST_CPUS = 2
GUEST_MEM_MB = 512
WORKLOAD_CPU = 0

DESCRIPTIONS = {
    "off": "events disabled, tracing off (in the guest)",
    "native": "events on, tracing on, no reader (in the guest)",
    "vmtrace": "vmtrace agent zipapp in the guest, --start --pump-cpus 1, splicing to the virtio-serial ports",
    "seedlike": "reference C agent (static) in the guest, its per-CPU output files are the virtio-serial ports",
    "copy": "naive read/write copy of each trace_pipe_raw in the guest into the CPU's virtio-serial port",
    "text": "`cat trace_pipe` in the guest into the virtio-serial port of CPU 0",
}

# The guest side. `$T` is tracefs. Every collector is started in the background under
# busybox `time`, which reports the collector's user+system seconds when it exits.
GUEST_LIB = r"""
T=/sys/kernel/tracing
B=/tmp/vmbench
mkdir -p $B
echo 0 > $T/tracing_on
echo %(buffer_kb)d > $T/buffer_size_kb
PORT0=$(lab_port trace-path-cpu0)
PORT1=$(lab_port trace-path-cpu1)
mkdir -p $B/seedout
ln -sf $PORT0 $B/seedout/cpu0
ln -sf $PORT1 $B/seedout/cpu1

lost() {
    n=0
    for c in 0 1; do
        o=$(sed -n 's/^overrun: //p' $T/per_cpu/cpu$c/stats)
        d=$(sed -n 's/^dropped events: //p' $T/per_cpu/cpu$c/stats)
        n=$((n + ${o:-0} + ${d:-0}))
    done
    echo $n
}
unread() {
    n=0
    for c in 0 1; do
        e=$(sed -n 's/^entries: //p' $T/per_cpu/cpu$c/stats)
        n=$((n + ${e:-0}))
    done
    echo $n
}
kids() {  # children of $1
    for s in /proc/[0-9]*/stat; do
        read -r pid comm st ppid rest < $s 2>/dev/null || continue
        [ "$ppid" = "$1" ] && echo $pid
    done
}
opened() {  # how many of pid $1's fds point at a path containing $2
    n=0
    for f in /proc/$1/fd/*; do
        case "$(readlink $f 2>/dev/null)" in *$2*) n=$((n + 1));; esac
    done
    echo $n
}
TIMES=""
PIDS=""
spawn() {  # spawn NAME CMD...: run CMD under time, remember the collector's pid
    tf=$B/time.$1
    shift
    rm -f $tf
    time -f "%%U %%S" -o $tf "$@" &
    tp=$!
    i=0
    k=""
    while [ -z "$k" ] && [ $i -lt 200 ]; do k=$(kids $tp); [ -n "$k" ] || sleep 0.05; i=$((i + 1)); done
    [ -n "$k" ] || { echo "$TAG ERR no child of time $tp"; return 1; }
    TIMES="$TIMES $tf"
    PIDS="$PIDS $k"
    TPIDS="$TPIDS $tp"
}
wait_open() {  # wait_open PATTERN COUNT: the collectors hold COUNT inputs open
    i=0
    while [ $i -lt 1200 ]; do
        n=0
        for p in $PIDS; do n=$((n + $(opened $p $1))); done
        [ $n -ge $2 ] && return 0
        for p in $PIDS; do [ -d /proc/$p ] || { echo "$TAG ERR collector $p exited at start"; return 1; }; done
        sleep 0.05
        i=$((i + 1))
    done
    echo "$TAG ERR collector did not open its inputs in 60 s"
    return 1
}
stop_all() {  # stop_all SIGNAL; sets CPU (not in $(...): a subshell cannot wait for our children)
    for p in $PIDS; do kill -$1 $p 2>/dev/null; done
    for p in $TPIDS; do wait $p 2>/dev/null; done
    cpu=0
    for f in $TIMES; do  # busybox time may add "Command terminated by signal N" first
        [ -s $f ] && cpu=$(awk -v c=$cpu '$1 ~ /^[0-9.]+$/ { c += $1 + $2 } END { print c }' $f)
    done
    CPU=$cpu
}

start_off() { :; }
start_native() { :; }
start_vmtrace() {
    spawn vmtrace python3 /lab/agent.pyz --start && wait_open trace_pipe_raw 2  # its defaults, as users run it
}
start_seedlike() {
    spawn seedlike /lab/bench/seedlike-agent $T $B/seedout 2 && wait_open trace_pipe_raw 2
}
start_copy() {
    spawn copy0 python3 -S /lab/bench/naive_copy.py $T/per_cpu/cpu0/trace_pipe_raw $PORT0 &&
    spawn copy1 python3 -S /lab/bench/naive_copy.py $T/per_cpu/cpu1/trace_pipe_raw $PORT1 &&
    wait_open trace_pipe_raw 2
}
start_text() {
    spawn text sh -c "exec cat $T/trace_pipe > $PORT0" && wait_open trace_pipe 1
}
SIG_off=INT; SIG_native=INT; SIG_vmtrace=INT; SIG_seedlike=INT; SIG_copy=TERM; SIG_text=INT

run_one() {  # run_one COLLECTOR WORKLOAD SECONDS
    c=$1; w=$2; s=$3
    TIMES=""; PIDS=""; TPIDS=""
    echo 0 > $T/tracing_on
    echo 0 > $T/events/enable
    echo > $T/trace
    if [ $c != off ]; then
        for e in %(events)s; do echo 1 > $T/events/$e/enable; done
    fi
    L0=$(lost)
    echo "$TAG BEGIN $c $w"
    [ $c != off ] && echo 1 > $T/tracing_on
    if ! start_$c; then
        echo 0 > $T/tracing_on
        stop_all KILL
        echo "$TAG END $c $w fail"
        return
    fi
    sleep %(settle)s
    S=$(taskset -c %(cpu)d $w $s | tail -n 1)
    echo 0 > $T/tracing_on
    L1=$(lost)
    U=$(unread)
    sig=$(eval echo \$SIG_$c)
    stop_all $sig
    [ $c = off ] || [ $c = native ] && CPU=-
    echo "$TAG END $c $w ok score=$S lost=$((L1 - L0)) unread=$U cpu=$CPU"
}
%(spinner)s
"""

SPINNER = """python3 -S -c 'import os
os.sched_setaffinity(0, {1})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True: pass' &
SPIN=$!
echo "$TAG SPINNER $SPIN"
"""


def guest_script(plan: List[tuple], cfg: ov.Config) -> str:
    """The per-run script: helpers, optional spinner, one `run_one` per planned run."""
    lib = GUEST_LIB % {"buffer_kb": cfg.buffer_kb, "events": " ".join(cfg.events), "settle": cfg.settle,
                       "cpu": WORKLOAD_CPU, "spinner": SPINNER if cfg.spinner else ""}
    lines = [". /lab/lib.sh", "TAG=%s" % TAG, lib]
    for name, workload, seconds in plan:
        lines.append("run_one %s %s %s" % (shlex.quote(name), shlex.quote(workload), "%g" % seconds))
    if cfg.spinner:
        lines.append("kill $SPIN 2>/dev/null")
    lines.append("echo \"$TAG DONE\"")
    return "\n".join(lines) + "\n"


def plan_runs(cfg: ov.Config, names: List[str]) -> List[tuple]:
    """(collector, workload, seconds) in run order: collectors rotate between repetitions."""
    plan = []
    for w in cfg.workloads:
        for rep in range(cfg.reps):
            k = rep % len(names)
            for c in names[k:] + names[:k]:
                plan.append((c, w, cfg.seconds))
    return plan


class PortReaders:
    """Drain every host-side ``.out`` FIFO of a prepared layout and count the bytes.

    The FIFOs are opened O_RDWR (never blocks, no EOF when QEMU reopens them) before
    QEMU starts, so QEMU's open never waits for a reader.
    """

    def __init__(self, paths: Dict[str, str]):
        self.fds = {name: os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC) for name, path in paths.items()}
        self.counts = {name: 0 for name in paths}
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="bench-port-readers", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        p = select.poll()
        by_fd = {fd: name for name, fd in self.fds.items()}
        for fd in by_fd:
            p.register(fd, select.POLLIN)
        p.register(self._stop_r, select.POLLIN)
        while True:
            for fd, _ev in p.poll():
                if fd == self._stop_r:
                    return
                try:
                    while True:
                        data = os.read(fd, 1 << 20)
                        if not data:
                            break
                        with self._lock:
                            self.counts[by_fd[fd]] += len(data)
                except BlockingIOError:
                    pass

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in list(self.fds.values()) + [self._stop_r, self._stop_w]:
            try:
                os.close(fd)
            except OSError:
                pass


def _parse_end(line: str) -> Optional[dict]:
    """`TAG END coll workload ok score=.. lost=.. unread=.. cpu=..` -> dict."""
    parts = line.split()
    if len(parts) < 5 or parts[1] != "END":
        return None
    out: dict = {"collector": parts[2], "workload": parts[3], "ok": parts[4] == "ok"}
    for kv in parts[5:]:
        if "=" in kv:
            k, v = kv.split("=", 1)
            out[k] = v
    return out


def _num(v: Optional[str]) -> Optional[float]:
    try:
        return float(v) if v not in (None, "", "-") else None
    except ValueError:
        return None


def run(cfg: ov.Config, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Boot the lab guest once, run every planned run in it, return the result document."""
    from vmtrace.host.layout import prepare
    from vmtrace.lab.image import build_image
    from vmtrace.lab.qemu import Guest

    say = progress or (lambda _msg: None)
    if cfg.reps < 1 or cfg.seconds <= 0:
        raise VmtraceError("--reps must be >= 1 and --seconds > 0")
    for w in cfg.workloads:
        if w not in ov.WORKLOADS:
            raise VmtraceError("unknown workload %r (have: %s)" % (w, ", ".join(ov.WORKLOADS)))
    unknown = [c for c in cfg.collectors if c not in coll.NAMES]
    if unknown:
        raise VmtraceError("unknown collector %s" % ", ".join(unknown))
    if "native" not in cfg.collectors:
        raise VmtraceError("the native collector is the reference: it cannot be left out")

    say("building (or finding) the lab image")
    image = build_image(progress=None)
    skipped: Dict[str, str] = {}
    files: Dict[str, bytes] = {}
    if "vmtrace" in cfg.collectors and not image.has_agent:
        skipped["vmtrace"] = "the lab image has no agent (vmtrace agent --export is not available)"
    if "seedlike" in cfg.collectors:
        try:
            files["lab/bench/seedlike-agent"] = peers.build("seedlike-agent", static=True).read_bytes()
        except VmtraceError as exc:
            skipped["seedlike"] = "cannot compile the reference agent static: %s" % exc
    files["lab/bench/naive_copy.py"] = coll._NAIVE_COPY.encode()
    names = [c for c in cfg.collectors if c not in skipped]
    for name, why in skipped.items():
        say("skipping %s: %s" % (name, why))
    plan = plan_runs(cfg, names)
    script = guest_script(plan, cfg)

    t0 = time.time()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="vmtrace-bench-guest-"))
    lay = prepare("bench", GUEST_CPUS, str(work / "guests"))
    outs = {p: os.path.join(lay.path, p + ".out") for p in lay.port_names()}
    readers = PortReaders(outs)
    ctl_in = os.open(lay.ctl + ".in", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    marks: List[tuple] = []          # (kind, payload, bytes so far, monotonic)
    ends: List[dict] = []
    errors: List[str] = []
    spinner_pid: List[str] = []

    def on_line(line: str) -> None:
        if not line.startswith(TAG + " "):
            return
        parts = line.split()
        if parts[1] == "BEGIN":
            marks.append(("BEGIN", tuple(parts[2:4]), readers.total(), time.monotonic()))
            say("guest: %s %s" % (parts[3], parts[2]))
        elif parts[1] == "END":
            marks.append(("END", tuple(parts[2:4]), readers.total(), time.monotonic()))
            e = _parse_end(line)
            if e:
                ends.append(e)
        elif parts[1] == "DONE":
            marks.append(("DONE", (), readers.total(), time.monotonic()))
        elif parts[1] == "ERR":
            errors.append(" ".join(parts[2:]))
        elif parts[1] == "SPINNER":
            spinner_pid.append(parts[2])

    per_run_budget = cfg.seconds + cfg.settle + 40.0   # TCG: a Python collector starts slowly
    ready: dict = {}
    boot_s = None
    try:
        say("booting the lab guest (TCG, %d vCPUs): %d runs" % (GUEST_CPUS, len(plan)))
        with Guest(image, script=script, files=files, qemu_args=lay.qemu_args(), smp=GUEST_CPUS,
                   memory_mb=GUEST_MEM_MB, accel="tcg", workdir=work / "qemu", on_line=on_line,
                   tcg_thread="multi") as g:
            t_boot = time.monotonic()
            ready = g.wait_ready(120)
            boot_s = round(time.monotonic() - t_boot, 1)
            code = g.wait_exit(60 + per_run_budget * len(plan))
            tail = g.script_lines()[-15:]
        if code != 0:
            raise VmtraceError("the guest benchmark script failed (exit %s): %s" % (code, " | ".join(tail[-5:])))
        time.sleep(0.2)
        final = readers.total()
    finally:
        readers.close()
        os.close(ctl_in)
        shutil.rmtree(work, ignore_errors=True)

    # bytes of run i: what arrived between its BEGIN and the next BEGIN (or the end)
    begins = [m for m in marks if m[0] == "BEGIN"]
    bytes_by_run = []
    for i, m in enumerate(begins):
        nxt = begins[i + 1][2] if i + 1 < len(begins) else final
        bytes_by_run.append(nxt - m[2])
    runs: Dict[str, Dict[str, List[dict]]] = {w: {c: [] for c in names} for w in cfg.workloads}
    failed: Dict[str, str] = {}
    for i, e in enumerate(ends):
        c, w = e["collector"], e["workload"]
        if not e["ok"] or _num(e.get("score")) is None:
            failed.setdefault(c, "failed to run in the guest (%s)" % (errors[0] if errors else "no score"))
            continue
        tracing = c != "off"
        runs[w][c].append({
            "score": _num(e.get("score")),
            "cpu_seconds": _num(e.get("cpu")) if c not in ("off", "native") else None,
            "bytes": (bytes_by_run[i] if i < len(bytes_by_run) else None) if c not in ("off", "native") else None,
            "lost": int(_num(e.get("lost")) or 0) if tracing else 0,
            "lost_reported": None,
            "unread": int(_num(e.get("unread")) or 0) if tracing else 0,
            "note": "",
        })
    if len(ends) != len(plan):
        raise VmtraceError("the guest reported %d of %d runs%s" % (len(ends), len(plan),
                           (": " + errors[0]) if errors else ""))
    for c, why in failed.items():
        skipped[c] = why
        for w in runs:
            runs[w].pop(c, None)
    if any(not runs[w].get("native") for w in runs):
        raise VmtraceError("the native reference did not run in the guest: %s" % (errors[:1] or "no score"))
    active = [c for c in names if c not in failed]
    return {
        **ov.result_header("guest", t0, load_start),
        "params": {
            "seconds": cfg.seconds, "reps": cfg.reps, "quick": cfg.quick, "events": list(cfg.events),
            "buffer_size_kb": cfg.buffer_kb, "workload_cpu": WORKLOAD_CPU, "reader_cpus": [1],
            "cpus": list(range(GUEST_CPUS)), "collectors": active,
            "idle_spinner": {"enabled": bool(cfg.spinner), "cpus": [1] if cfg.spinner else [],
                             "policy": "SCHED_IDLE" if cfg.spinner else None,
                             "what": "busy loop on vCPU1 at SCHED_IDLE inside the guest for the whole run"
                             if cfg.spinner else "turned off (--no-spinner)"},
            "guest": {"accel": "tcg", "vcpus": GUEST_CPUS, "memory_mb": GUEST_MEM_MB,
                      "kernel": ready.get("kernel"), "boot_to_ready_s": boot_s,
                      "ports": "virtio-serial trace-path-cpuN -> host FIFOs drained by reader threads",
                      "image": image.key[:16]},
        },
        "collectors": {c: DESCRIPTIONS[c] for c in cfg.collectors},
        "skipped": skipped,
        "errors": errors,
        "workloads": {w: {"unit": ov.WORKLOADS[w], "collectors": ov.summarize_workload(runs[w])}
                      for w in cfg.workloads},
    }
