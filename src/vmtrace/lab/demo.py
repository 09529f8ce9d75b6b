"""`vmtrace demo`: boot the lab guest, trace it with the real agent, and show the result.

The demo is the whole product in one command, so it uses the same pieces a user would:
the lab image (``vmtrace lab``), the prepared FIFOs (``host.layout.prepare``), the guest
agent speaking the framed protocol over real virtio-serial ports, and the recorder
(``host.recording.record``). Nothing is simulated; the demo only adds the choreography.

The choreography is the delicate part, because the host and the guest have no shared
clock and only the serial console to talk about progress:

1. The guest's script starts the agent and prints :data:`AGENT_READY` once the agent
   holds every port open. Before that, a hello written by the host would wait in the
   FIFO while the recorder's short hello timeout ran out and it fell back to the seed's
   plain mode.
2. The recorder configures (which turns ``tracing_on`` off) and starts (which turns it
   on). The guest waits for "events enabled and tracing on" and only then runs the
   workload, so the workload runs inside the recording, not before it.
3. The recorder stops after the workload's length plus a margin, says bye, the agent
   restores tracefs and exits, the script ends and the guest powers off.

This module holds that logic and returns plain data; ``commands/demo.py`` draws it.
:class:`AgentGuest` is also what the end-to-end tests boot, so the demo and the tests
exercise the same wiring.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from vmtrace.errors import VmtraceError

GUEST_NAME = "demo"
EVENTS = ("sched", "timer", "kmem", "irq")
AGENT_READY = "VMTRACE-DEMO AGENT-READY"
TRACING = "VMTRACE-DEMO TRACING"
WORKLOAD_DONE = "VMTRACE-DEMO WORKLOAD-DONE"
SCORE = "VMTRACE-DEMO SCORE"
MARKER = "demo.json"          # written into the output directory; lets a rerun replace it
REPORT_LINES = 15

# The guest side of the choreography (module docstring). `$1`-style arguments are not
# available to /lab/run.sh, so the pieces are formatted in by guest_script().
_SCRIPT = r""". /lab/lib.sh
python3 /lab/agent.pyz {agent_args} > /tmp/agent.log 2>&1 &
AGENT=$!
# ready = the agent holds the control port and every data port open
want=$(( $(grep -c ^processor /proc/cpuinfo) + 1 ))
i=0
while :; do
    n=0
    for f in /proc/$AGENT/fd/*; do
        case "$(readlink $f 2>/dev/null)" in /dev/vport*) n=$((n + 1));; esac
    done
    [ $n -ge $want ] && break
    if ! kill -0 $AGENT 2>/dev/null; then
        echo "VMTRACE-DEMO AGENT-FAILED"; tail -n 5 /tmp/agent.log; exit 3
    fi
    i=$((i + 1)); [ $i -gt 1200 ] && {{ echo "VMTRACE-DEMO AGENT-FAILED (ports not open)"; exit 3; }}
    sleep 0.05
done
echo "{ready}"
{wait_tracing}
{workload}
echo "{done}"
# The host says bye after it stops; the agent then restores tracefs and exits.
i=0
while kill -0 $AGENT 2>/dev/null && [ $i -lt {agent_wait} ]; do sleep 0.1; i=$((i + 1)); done
kill $AGENT 2>/dev/null
sed 's/^/agent: /' /tmp/agent.log | tail -n 8
"""

_WAIT_TRACING = r"""i=0
until [ "$(cat $T/events/sched/sched_switch/enable)" = 1 ] && [ "$(cat $T/tracing_on)" = 1 ]; do
    i=$((i + 1)); [ $i -gt 1200 ] && { echo "VMTRACE-DEMO NEVER-STARTED"; break; }
    sleep 0.02
done
echo "VMTRACE-DEMO TRACING"
"""


def guest_script(workload: str, *, agent_args: str = "", wait_for_tracing: bool = True,
                 agent_wait_s: float = 60.0) -> str:
    """The per-run script: agent up, (wait for the recorder's start), workload, agent gone.

    ``workload`` is shell text run in the guest; it may print ``SCORE`` lines (see
    :func:`workload_command`). ``wait_for_tracing`` holds it back until the host has
    configured sched events and started tracing, which only a recorder does.
    """
    return _SCRIPT.format(agent_args=agent_args, ready=AGENT_READY, done=WORKLOAD_DONE,
                          wait_tracing=_WAIT_TRACING if wait_for_tracing else "",
                          workload=workload, agent_wait=int(agent_wait_s * 10))


def workload_command(seconds: float, smp: int, tag: str = "") -> str:
    """pingpong on vCPU 0 and, with a second vCPU, intloop on vCPU 1; both print scores.

    Pinning keeps the picture readable (one vCPU switching hard between the two pingpong
    processes, the other running one busy task) and mirrors the benchmark's setup.
    """
    s = shlex.quote("%g" % seconds)
    t = (" " + tag) if tag else ""
    if smp >= 2:
        # `wait` with pids: a bare `wait` would also wait for the agent
        return (f"taskset -c 0 pingpong {s} > /tmp/pp{tag} & PP=$!\n"
                f"taskset -c 1 intloop {s} > /tmp/il{tag} & IL=$!\n"
                f"wait $PP $IL\n"
                f'echo "{SCORE}{t} pingpong $(cat /tmp/pp{tag}) intloop $(cat /tmp/il{tag})"')
    return (f"pingpong {s} > /tmp/pp{tag}\n"
            f'echo "{SCORE}{t} pingpong $(cat /tmp/pp{tag})"')


def parse_scores(lines: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """``SCORE [tag] name value ...`` console lines -> {tag: {name: value}} ('' = no tag)."""
    out: Dict[str, Dict[str, float]] = {}
    for line in lines:
        if not line.startswith(SCORE):
            continue
        words = line[len(SCORE):].split()
        tag = ""
        if len(words) % 2:
            tag, words = words[0], words[1:]
        scores = out.setdefault(tag, {})
        for name, value in zip(words[::2], words[1::2]):
            try:
                scores[name] = float(value)
            except ValueError:
                pass
    return out


class AgentGuest:
    """The lab guest booted with prepared ports and the agent running, ready for a host.

    A context manager: on entry the ports are prepared under ``workdir``, QEMU boots,
    and we wait for :data:`AGENT_READY`; on exit QEMU is gone, whatever happened (the
    lab's ``Guest`` kills it, and it dies with us anyway through PDEATHSIG).
    """

    def __init__(self, image: Any, script: str, workdir: Path, *, smp: int = 2, accel: str = "tcg",
                 name: str = GUEST_NAME, memory_mb: int = 512,
                 on_line: Optional[Callable[[str], None]] = None) -> None:
        from vmtrace.host.layout import prepare
        from vmtrace.lab.qemu import Guest

        if not image.has_agent:
            raise VmtraceError("the lab image has no agent (vmtrace agent --export failed at build time)")
        self.workdir = Path(workdir)
        self.layout = prepare(name, smp, str(self.workdir / "guests"))
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._user_on_line = on_line
        # QMP and named threads let the recorder map each vCPU to its host thread
        # (host/vcpusync.py: the microsecond clock sync and the steal tracks)
        # in a short directory of its own: a unix socket path holds at most 107 bytes,
        # and a test's workdir can be longer
        self._qmp_dir = tempfile.mkdtemp(prefix="vmtq-")
        self.qmp = Path(self._qmp_dir) / "qmp.sock"
        qemu_args = self.layout.qemu_args() + ["-name", "%s,debug-threads=on" % name,
                                               "-qmp", "unix:%s,server=on,wait=off" % self.qmp]
        self.guest = Guest(image, script=script, qemu_args=qemu_args, smp=smp,
                           memory_mb=memory_mb, accel=accel, workdir=self.workdir / "qemu",
                           on_line=self._on_line)

    def _on_line(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()
        if self._user_on_line:
            self._user_on_line(line)

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The first script line starting with ``prefix``; one clear error if it never comes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or not self.guest.running:
                    break
                self._cond.wait(min(left, 0.2))
        tail = " | ".join(l for l in self.lines[-4:] if l.strip()) or "no output"
        state = "still running" if self.guest.running else "QEMU exited"
        raise VmtraceError("the guest did not print %r within %.0f s (%s; last: %s)"
                           % (prefix, timeout, state, tail[:300]))

    def start(self, boot_timeout: float = 90.0, agent_timeout: float = 60.0) -> "AgentGuest":
        self.guest.start()
        self.ready = self.guest.wait_ready(boot_timeout)
        line = self.wait_line("VMTRACE-DEMO AGENT-", agent_timeout)
        if not line.startswith(AGENT_READY):
            raise VmtraceError("the agent did not start in the guest: %s" % line)
        return self

    def __enter__(self) -> "AgentGuest":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.guest.show_console_under_pytest()
        self.close()

    def close(self) -> None:
        self.guest.close()
        shutil.rmtree(self._qmp_dir, ignore_errors=True)


# -- the demo ---------------------------------------------------------------------------------

@dataclass
class DemoOptions:
    """What `vmtrace demo` was asked for."""

    seconds: float = 5.0
    outdir: str = "vmtrace-demo"
    host_events: Optional[List[str]] = None
    smp: int = 2
    accel: str = "auto"
    events: Sequence[str] = EVENTS


@dataclass
class DemoResult:
    """Everything the demo shows, as plain data (the click layer renders it)."""

    outdir: str
    dat: str
    png: Optional[str]
    html: Optional[str]
    host_dat: Optional[str]
    accel: str
    ready: Dict[str, str]
    session: Dict[str, Any]
    stats: Dict[str, Any]
    report: List[str]
    scores: Dict[str, float]
    bytes: int
    pages: int
    agent_lost: int
    timings: Dict[str, float] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    sync: str = ""          # the merged timeline's clock sync bound, as the title says it


class Ui:
    """What the demo tells its caller while it runs; the default says nothing."""

    def phase(self, text: str) -> None:
        """A new step started (building, booting, recording, writing, rendering)."""

    def recording(self, elapsed: float, total: float, nbytes: int, pages: int) -> None:
        """Live figures, about four times a second while recording."""

    def guest_line(self, line: str) -> None:
        """A line the guest's script printed."""


def _claim_outdir(path: str) -> str:
    """Use ``path`` for a fresh demo; replace a previous demo's files, refuse anything else.

    `make demo` is meant to be run again and again, so a directory that a previous demo
    filled (it has our marker) is emptied of exactly what that demo wrote; a directory
    holding some other recording is left alone with a clear error.
    """
    path = os.path.abspath(path)
    if os.path.islink(path):
        raise VmtraceError("output directory %s is a symlink; refusing" % path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise VmtraceError("%s exists and is not a directory; choose another -o" % path)
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, MARKER)
    entries = os.listdir(path)
    recordingish = [e for e in entries if e.endswith((".dat", ".raw", ".png", ".html")) or e == "session.json"]
    if recordingish and not os.path.isfile(marker):
        raise VmtraceError("%s already holds a recording that the demo did not make; choose another -o" % path)
    if os.path.isfile(marker):
        for e in recordingish + [MARKER]:
            p = os.path.join(path, e)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
    return path


def _stream_totals(session: Any) -> tuple[int, int]:
    nbytes = pages = 0
    for g in session.guests.values():
        for s in g.streams.values():
            st = s.stats()
            nbytes += int(st["written"])
            pages += int(st["pages"])
    return nbytes, pages


def _sync_bound(outdir: str) -> str:
    """`; guest on host clock within +-X us (method)` for the merged timeline's title."""
    from vmtrace.session import Session
    try:
        s = Session(outdir)
        s.clock_map(GUEST_NAME)
        r = s.reports.get(GUEST_NAME)
    except VmtraceError as exc:
        return "; guest not on the host's clock (%s)" % str(exc)[:80]
    if r is None:
        return ""
    return "; guest on the host's clock within +-%.1f us (%s)" % (r.max_error_ns / 1000.0, r.method)


def run_demo(opts: DemoOptions, ui: Optional[Ui] = None,
             stop: Optional[threading.Event] = None) -> DemoResult:
    """Build, boot, record, write and render; see the module docstring for the order.

    Raises VmtraceError with one line on any failure; QEMU is gone when this returns or
    raises. ``stop`` (set by Ctrl-C) ends the recording early but still writes the files.
    """
    from vmtrace.host.recording import record
    from vmtrace.lab.image import build_image
    from vmtrace.lab.qemu import resolve_accel

    ui = ui or Ui()
    if not 0 < opts.seconds <= 600:
        raise VmtraceError("--seconds must be between 0 and 600")
    if not 1 <= opts.smp <= 8:
        raise VmtraceError("--smp must be between 1 and 8")
    t_all = time.monotonic()
    timings: Dict[str, float] = {}
    outdir = _claim_outdir(opts.outdir)

    ui.phase("building the guest image (cached after the first run)")
    t = time.monotonic()
    image = build_image()
    timings["build"] = time.monotonic() - t

    t = time.monotonic()
    accel = resolve_accel(image, opts.accel)
    timings["accel probe"] = time.monotonic() - t

    script = guest_script(workload_command(opts.seconds, opts.smp), agent_wait_s=60)
    stop = stop or threading.Event()
    with tempfile.TemporaryDirectory(prefix="vmtrace-demo-") as tmp:
        ui.phase("booting the guest (%s, %d vCPU)" % (accel.upper(), opts.smp))
        t = time.monotonic()
        with AgentGuest(image, script, Path(tmp), smp=opts.smp, accel=accel, on_line=ui.guest_line) as ag:
            timings["boot"] = time.monotonic() - t
            if stop.is_set():
                raise VmtraceError("interrupted before the recording started")
            ui.phase("recording %s in the guest for %g s" % (",".join(opts.events), opts.seconds))
            total = opts.seconds + 0.5   # the workload starts a moment after the start order

            def progress(session: Any) -> None:
                nbytes, pages = _stream_totals(session)
                elapsed = (time.monotonic_ns() - session.started_ns) / 1e9 if session.started_ns else 0.0
                ui.recording(elapsed, total, nbytes, pages)

            t = time.monotonic()
            doc = record([ag.layout.path], outdir=outdir, duration=total, events=list(opts.events),
                         progress=progress, stop=stop, host_events=opts.host_events,
                         hello_timeout=10.0, connect_timeout=120.0)
            timings["record+write"] = time.monotonic() - t
            t = time.monotonic()
            if not stop.is_set():
                # (if interrupted, the workload may run on for a while: close() kills it)
                ui.phase("waiting for the guest to power off")
                try:
                    ag.guest.wait_exit(30)
                except VmtraceError:
                    pass   # close() kills it; the recording is already on disk
            timings["shutdown"] = time.monotonic() - t
            lines = list(ag.lines)
            ready = dict(ag.ready)

    entry = doc["guests"].get(GUEST_NAME, {})
    problems = ["%s: %s" % (GUEST_NAME, p) for p in entry.get("problems", [])]
    if doc.get("host"):
        problems += ["host: %s" % p for p in doc["host"].get("problems", [])]
    problems += doc.get("errors", [])
    if not entry.get("file"):
        raise VmtraceError("no trace.dat was written: %s" % ("; ".join(problems) or doc.get("stop_reason")))
    dat = os.path.join(outdir, entry["file"])
    host_dat = os.path.join(outdir, doc["host"]["file"]) if doc.get("host", {}).get("file") else None

    ui.phase("decoding the trace and rendering the report and timeline")
    t = time.monotonic()
    from vmtrace import source as vsource
    from vmtrace.text import trace_lines

    with vsource.open(dat) as trace:
        stats = trace.stats()
        report = list(islice(trace_lines(trace), REPORT_LINES))
    timings["decode"] = time.monotonic() - t
    t = time.monotonic()
    png = os.path.join(outdir, "timeline.png")
    html = os.path.join(outdir, "timeline.html")
    from vmtrace.export.html import write_timeline

    source = outdir if host_dat else dat
    sync = _sync_bound(outdir) if host_dat else ""
    try:
        write_timeline(source, png, html, title="vmtrace demo: guest %s (%d vCPU, %s), %g s%s"
                       % (GUEST_NAME, opts.smp, accel.upper(), opts.seconds, sync))
    except VmtraceError as exc:
        problems.append("timeline not drawn: %s" % exc)
        png = html = None
    timings["timeline"] = time.monotonic() - t

    host_stats = entry.get("stats", {}).get("host", {})
    agent = entry.get("stats", {}).get("agent") or {}
    agent_cpus = agent.get("cpus", agent) if isinstance(agent, dict) else {}
    agent_lost = sum(int(a.get("lost_events", 0)) for a in agent_cpus.values() if isinstance(a, dict))
    scores = parse_scores(lines).get("", {})
    timings["total"] = time.monotonic() - t_all
    result = DemoResult(outdir=outdir, dat=dat, png=png, html=html, host_dat=host_dat, accel=accel,
                        ready=ready, session=doc, stats=stats, report=report, scores=scores,
                        bytes=sum(int(s["written"]) for s in host_stats.values()),
                        pages=sum(int(s["pages"]) for s in host_stats.values()),
                        agent_lost=agent_lost, timings=timings, problems=problems, sync=sync.lstrip("; "))
    files = [os.path.basename(p) for p in (dat, host_dat, png, html) if p] + ["session.json"]
    with open(os.path.join(outdir, MARKER), "w") as f:
        json.dump({"files": files, "seconds": opts.seconds, "accel": accel, "scores": scores,
                   "timings": {k: round(v, 2) for k, v in timings.items()}}, f, indent=1)
    return result
