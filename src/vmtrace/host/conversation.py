"""What the recorder says to one guest's agent, from hello to bye.

Each guest's setup and end are generators (:data:`~vmtrace.host.state.Task`) that the
recording's loop steps once per turn, and a request inside them yields until its reply
comes or its time runs out: a guest that is slow, silent or hostile holds up nobody
else's probes, the duration or Ctrl-C. While the guest records, the loop calls
:func:`schedule` and :func:`collect` for its time probes and statistics. Every value
the guest sends is checked on arrival (:mod:`~vmtrace.host.guestdata`,
:mod:`~vmtrace.host.metadata`); what cannot be used is the guest's problem, or, before
its start, its failure (a VmtraceError the loop turns into one).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Generator, Optional

from vmtrace import protocol
from vmtrace.errors import VmtraceError
from vmtrace.host import vcpusync
from vmtrace.host.control import Request
from vmtrace.host.guestdata import (check_cpu_stats, check_hello, check_meta, check_probe, check_stats,
                                    clock_name, short, text)
from vmtrace.host.metadata import check_metadata, formats_metadata
from vmtrace.host.outputs import write_metadata
from vmtrace.host.state import Guest, Options, Task

PROBE_PERIOD_S = 0.5
STATS_PERIOD_S = 1.0
# Ceilings for waiting on a guest's agent. They only matter on a sick machine: a
# healthy TCG guest answers each in about a second.
CONFIGURE_TIMEOUT_S = 120.0
METADATA_TIMEOUT_S = 120.0
ORDER_TIMEOUT_S = 30.0
MAX_PENDING_PROBES = 64    # unanswered probes remembered per guest (32 s of them)
MAX_PROBES = 1 << 16       # probes kept per guest (9 h at 2/s, ~15 MB); older ones are thinned
# The metadata asked for again after the stop has no kallsyms: formats (a few MB for
# every event of a kernel) and saved_cmdlines (<1 MB). Capped apart, so the end of a
# recording never holds two full --max-metadata copies of one guest.
REFRESH_CAP = 8 << 20


# -- setup -----------------------------------------------------------------------------
def setup(g: Guest, opts: Options) -> Task:
    """A guest from its first byte to its start order, one step per loop turn (its
    ports have connected)."""
    # Without --formats a silent agent is an error anyway, so give a slow-starting
    # guest (Python under TCG takes seconds) the whole connect timeout to answer.
    wait = opts.hello_timeout if opts.formats_dir else opts.connect_timeout
    timeout = wait + (10.0 if g.process else 0.0)
    hello = yield from _ask(g, "hello", timeout, every=10.0, version=protocol.VERSION,
                            host=os.uname().nodename)
    if hello is None or hello.name != "hello":
        _plain_setup(g, opts, timeout)
    else:
        yield from _negotiate(g, opts, hello)
    yield from _start(g)


def _negotiate(g: Guest, opts: Options, hello: protocol.Message) -> Task:
    link = g.link
    assert link is not None
    g.framed = True
    try:
        g.cpus, g.info = check_hello(hello.fields)
    except VmtraceError as exc:
        raise VmtraceError("%s: %s" % (g.name, exc)) from None
    missing = [c for c in g.cpus if c >= g.layout.cpus]
    if missing:
        g.problem("agent traces CPUs %s but only %d data ports were prepared" % (short(missing), g.layout.cpus))
    conf: Dict[str, Any] = {}
    events = opts.host_events if g.process else opts.events
    served = bool(g.sync) and g.sync.get("method") in ("tcg", "kvm")   # host/vcpusync.py
    if events and served and g.sync.get("method") == "tcg":
        events = list(events) + [e for e in vcpusync.GUEST_SYNC_EVENTS if e not in events]
    if events:
        conf["events"] = list(events)
    clock = "mono" if g.process else (opts.clock or ("x86-tsc" if served else None))
    if clock:
        conf["clock"] = clock
    if opts.buffer_kb:
        conf["buffer_size_kb"] = int(opts.buffer_kb)
    conf["buffer_percent"] = 50
    # Enabling tracepoints patches kernel text and waits for every other vCPU to
    # answer an IPI; in a TCG guest on a busy host that alone took over 10 s (and
    # with a host thread per vCPU it could wedge for good: docs/lab.md). These are
    # ceilings for a sick machine; a healthy guest answers in about a second.
    rep = yield from _ask(g, "configure", CONFIGURE_TIMEOUT_S, every=5.0, **conf)
    if rep is None or rep.name != "ok":
        why = text(rep.get("message"), 200) if rep is not None else "no reply" + _why_silent(g)
        raise VmtraceError("%s: agent refused the configuration: %s" % (g.name, why))
    cap = opts.max_metadata
    rep = yield from _ask(g, "metadata", METADATA_TIMEOUT_S, every=15.0, blob_cap=cap,
                          kallsyms=opts.kallsyms)
    if rep is None or rep.name != "metadata":
        raise VmtraceError("%s: agent sent no metadata%s" % (g.name, _why_silent(g)))
    if rep.blob_dropped:
        raise VmtraceError("%s: metadata is %d bytes, over the %d-byte cap (--max-metadata)"
                           % (g.name, rep.blob_dropped, cap))
    try:
        files = protocol.unpack_files(rep)
    except protocol.ProtocolError as exc:
        raise VmtraceError("%s: metadata: %s" % (g.name, exc.what)) from None
    del rep
    g.metadata, g.meta = check_metadata(g.name, files, cap)
    g.clock = g.meta["clock"] or clock or clock_name(g.info.get("clock")) or "local"
    write_metadata(g)


def _plain_setup(g: Guest, opts: Options, waited: float) -> None:
    """A seed-style agent: only ``1``/``0``; metadata must come from --formats."""
    if not opts.formats_dir:
        raise VmtraceError("%s: no hello reply from the agent in %.0f s%s: it is not running, not started "
                           "yet (--connect-timeout), or a seed-style agent, which needs --formats DIR (a "
                           "copy of the guest's tracefs events/ directory and header files)"
                           % (g.name, waited, _why_silent(g)))
    g.framed = False
    g.cpus = list(range(g.layout.cpus))
    g.clock = opts.clock or "local"
    g.metadata = formats_metadata(opts.formats_dir, g.name, g.cpus, g.clock, opts.max_metadata)
    g.meta = check_meta(json.loads(g.metadata["meta.json"]), g.name)
    write_metadata(g)


def _start(g: Guest) -> Task:
    assert g.link is not None
    t0 = time.monotonic_ns()
    g.start_ns = t0
    g.started = True
    if g.framed:
        # seq: the agent writes `vmtrace-order kind=start seq=N`, checked like a probe
        g.order_seq += 1
        rep = yield from _ask(g, "start", ORDER_TIMEOUT_S, seq=g.order_seq)
        ok = rep is not None and rep.name == "ok"
        g.orders.append(["start", t0, g.arrived_ns if ok else None, g.order_seq])
    else:
        ok = yield from _plain_order(g, True)
        g.orders.append(["start", t0, time.monotonic_ns() if ok else None])
    if not ok:
        g.problem("no acknowledgement of the start order")
    g.state = "running"
    g.next_probe = time.monotonic()
    g.next_stats = time.monotonic() + STATS_PERIOD_S


# -- while recording -------------------------------------------------------------------
def schedule(g: Guest, now: float) -> None:
    """Time probes and stats requests, when due, for a guest that is recording."""
    if g.state != "running" or not g.framed or g.link is None:
        return
    if now >= g.next_probe:
        g.seq += 1
        t = time.monotonic_ns()
        rid = g.link.send("time_probe", seq=g.seq)
        if rid is not None:
            g.pending_probes[rid] = (t, g.seq)
            if len(g.pending_probes) > MAX_PENDING_PROBES:
                old = next(iter(g.pending_probes))
                del g.pending_probes[old]
                g.link.forget(old)
        g.next_probe = now + PROBE_PERIOD_S
    if now >= g.next_stats:
        g.link.forget(g.pending_stats)
        g.pending_stats = g.link.send("stats")
        g.next_stats = now + STATS_PERIOD_S


def collect(g: Guest) -> None:
    """File the probe and stats replies that came, each checked on arrival."""
    link = g.link
    assert link is not None
    for rid in [r for r in g.pending_probes if r in link.replies]:
        t_recv = link.arrived_ns.get(rid, 0)
        rep = link.take(rid)
        sent, seq = g.pending_probes.pop(rid)
        gns = check_probe(rep.fields, seq) if rep is not None and rep.name == "time_probe" else None
        if gns is None or t_recv < sent:
            g.bad_probes += 1
            continue
        # seq pairs the probe with its `vmtrace-probe seq=N` marker (merge, check)
        g.probes.append([sent, gns, t_recv, seq])
        if len(g.probes) > MAX_PROBES:
            del g.probes[:MAX_PROBES // 2:2]  # thin the older half: the fit keeps its span
    if g.pending_stats is not None and g.pending_stats in link.replies:
        rep = link.take(g.pending_stats)
        g.pending_stats = None
        st = check_stats(rep.fields, g.layout.cpus) if rep is not None and rep.name == "stats" else None
        if st is None:
            g.bad_stats += 1
        else:
            g.agent_stats, g.agent_info = st["cpus"], st["agent"]


# -- stopping --------------------------------------------------------------------------
def finish(g: Guest, opts: Options) -> Task:
    """Stop, saved_cmdlines again, bye: one guest's end, beside the others'."""
    link = g.link
    assert link is not None
    for rid in list(g.pending_probes) + [g.pending_stats]:
        link.forget(rid)
    g.pending_probes.clear()
    g.pending_stats = None
    t0 = time.monotonic_ns()
    if g.framed:
        g.order_seq += 1
        seq = g.order_seq
        rep = yield from _ask(g, "stop", ORDER_TIMEOUT_S, seq=seq)
        g.orders.append(["stop", t0, g.arrived_ns if rep is not None else None, seq])
        if rep is None:
            # A guest silent for the stop's whole ceiling will not answer saved_cmdlines
            # or bye either: asking would only add their ceilings to the end.
            g.problem("no acknowledgement of the stop order")
            g.stop_ns = time.monotonic_ns()
            g.state = "stopped"
            return
        if "stats" in rep.fields:
            _take_stats(g, rep.fields["stats"])
    else:
        ok = yield from _plain_order(g, False)
        g.orders.append(["stop", t0, None])
        if not ok:
            g.problem("could not send the stop order")
    g.stop_ns = time.monotonic_ns()
    yield from _refresh_cmdlines(g, opts)
    g.state = "stopped"
    # Over a transport whose agent stays (sockets), the guest runs on and so does
    # its agent; closing the control port tells it we left, and the next `vmtrace
    # record` finds it again. Without bye its tracefs settings stay as configured
    # until it exits.
    if g.layout.backend.agent_stays and g.process is None:
        return
    if g.framed and not link.eof and link.rfd is not None:
        t0 = time.monotonic_ns()
        rep = yield from _ask(g, "bye", ORDER_TIMEOUT_S)
        g.orders.append(["bye", t0, g.arrived_ns if rep is not None else None])
        if rep is not None and "stats" in rep.fields:
            _take_stats(g, rep.fields["stats"])


def _refresh_cmdlines(g: Guest, opts: Options) -> Task:
    """Take the guest's saved_cmdlines again after the stop, as trace-cmd does.

    Tasks started during the recording are only in the list at the end; tasks that
    exited early may have been evicted from it, so the start's entries are kept for
    pids the end no longer names.
    """
    if not g.framed or g.link is None or g.link.eof:
        return
    cap = min(opts.max_metadata, REFRESH_CAP)
    rep = yield from _ask(g, "metadata", METADATA_TIMEOUT_S / 2, every=15.0, blob_cap=cap, kallsyms=False)
    if rep is None or rep.name != "metadata" or rep.blob_dropped:
        g.problem("could not refresh saved_cmdlines after the stop")
        return
    try:
        files, _ = check_metadata(g.name, protocol.unpack_files(rep), cap)
    except VmtraceError as exc:
        g.problem("saved_cmdlines after the stop: %s" % exc)
        return
    end = files.get("saved_cmdlines")
    if end is not None:
        g.metadata["saved_cmdlines"] = merge_cmdlines(g.metadata.get("saved_cmdlines", b""), end)


def _take_stats(g: Guest, value: Any) -> None:
    """Per-CPU counters that came with stop or bye, checked."""
    st = check_cpu_stats(value, g.layout.cpus)
    if st is None:
        g.bad_stats += 1
    else:
        g.agent_stats = st


# -- asking ----------------------------------------------------------------------------
def _ask(g: Guest, name: str, timeout: float, every: Optional[float] = None, blob_cap: int = 0,
         **fields: Any) -> Generator[None, None, Optional[protocol.Message]]:
    """A request from inside a guest's task: yields to the loop until answered."""
    assert g.link is not None
    req = Request(g.link, name, timeout, every=every, blob_cap=blob_cap, **fields)
    while not req.poll():
        yield
    if req.malformed:
        raise VmtraceError("%s: a malformed frame came where the %s reply was awaited: %s"
                           % (g.name, name, g.link.last_error))
    g.arrived_ns = req.arrived_ns or time.monotonic_ns()
    return req.reply


def _plain_order(g: Guest, start: bool) -> Generator[None, None, bool]:
    """A seed order, written without blocking the loop; False if not taken in 2 s."""
    assert g.link is not None
    if not g.link.queue_order(start):
        return False
    deadline = time.monotonic() + 2.0
    while g.link.queued and not g.link.eof and time.monotonic() < deadline:
        yield
    return not g.link.queued and not g.link.eof


def _why_silent(g: Guest) -> str:
    desc = g.link.describe_errors() if g.link is not None else ""
    return " (%s)" % desc if desc else ""


def merge_cmdlines(start: bytes, end: bytes) -> bytes:
    """saved_cmdlines from the end of a recording, plus start entries for other pids."""
    def pids(text: bytes) -> Dict[bytes, bytes]:
        out: Dict[bytes, bytes] = {}
        for line in text.splitlines():
            pid, _, comm = line.strip().partition(b" ")
            if pid.isdigit() and comm:
                out[pid] = line.strip()
        return out

    later = pids(end)
    kept = [line for pid, line in pids(start).items() if pid not in later]
    lines = kept + list(later.values())
    return b"".join(line + b"\n" for line in lines)
