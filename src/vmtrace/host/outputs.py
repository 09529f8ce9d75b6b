"""What a recording leaves behind: each guest's trace.dat and the session's session.json.

Written at the end from what the recording checked on arrival (:mod:`~vmtrace.host.state`),
one guest at a time, so that one guest's failure costs only that guest its file: its
raw spool stays, and session.json is written regardless (docs/host.md, "Session
directory").
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Iterable, List, Optional

from vmtrace.errors import VmtraceError
from vmtrace.host.guestdata import clock_name
from vmtrace.host.metadata import finish_meta
from vmtrace.host.state import HOST_NAME, Guest, Options


def write_metadata(g: Guest) -> None:
    """The guest's metadata into its spool, as the raw directory layout has it."""
    from vmtrace.format.rawdir import write_metadata as write_into

    write_into(g.raw, g.metadata)


def stream_stats(g: Guest) -> Dict[str, Dict[str, Any]]:
    return {str(c): s.stats() for c, s in g.streams.items()}


def write_dat(g: Guest, outdir: str, opts: Options) -> Optional[str]:
    """This guest's trace.dat; whatever goes wrong stays this guest's problem, and the
    line for the session's errors is returned.

    Every value the writer gets was checked on arrival; the broad catch is the
    isolation boundary all the same: a bug met by one guest's data must not cost
    the other guests their files.
    """
    from vmtrace.format.tracedat_write import write_tracedat

    if not g.started:
        return None
    if not g.metadata:
        g.problem("no metadata: trace.dat not written")
        return None
    ports = g.layout.cpus
    target = os.path.join(outdir, g.name + ".dat")
    try:
        g.metadata = finish_meta(g.metadata, g.name, g.meta, g.clock, ports, g.agent_stats,
                                 stream_stats(g))
        cpu_files = {}
        for cpu in (g.cpus or range(ports)):
            path = os.path.join(g.raw, "cpu%d" % cpu)
            if cpu < ports and os.path.exists(path):
                cpu_files[cpu] = path
        write_metadata(g)
        write_tracedat(target, g.metadata, cpu_files, version=opts.file_version,
                       compression=opts.compression if opts.file_version == 7 else None,
                       options={"hostname": g.name, "kernel": g.meta.get("kernel") or "unknown",
                                "clock": g.clock or "local", "cpucount": ports})
    except Exception as exc:  # noqa: BLE001 - see the docstring
        if isinstance(exc, OSError):
            why = exc.strerror or str(exc)
        elif isinstance(exc, VmtraceError):
            why = str(exc)
        else:
            why = "internal error %s: %s" % (type(exc).__name__, exc)
        g.problem("%s.dat not written (%s); the raw spool %s is kept (vmtrace report reads it)"
                  % (g.name, why, g.raw))
        return "%s: %s.dat not written: %s" % (g.name, g.name, why)
    g.file = os.path.basename(target)
    if not opts.keep_raw and not g.write_failed:
        shutil.rmtree(g.raw, ignore_errors=True)
    return None


def guest_entry(g: Guest) -> Dict[str, Any]:
    link = g.link
    problems = list(g.problems)
    if g.more_problems:
        problems.append("... and %d more problems" % g.more_problems)
    entry: Dict[str, Any] = {
        "file": g.file,
        "clock": g.clock,
        "cpus": len(g.cpus) if g.cpus else g.layout.cpus,
        "protocol": "vmtrace" if g.framed else "plain",
        "state": g.state,
        "stats": {"host": stream_stats(g), "agent": g.agent_stats},
        "probes": g.probes,
        "orders": g.orders,
        "problems": problems,
        # what the guest said about itself: checked, never used in place of the above
        "guest": {"hello": g.info, "meta": g.meta.get("guest", {}), "agent": g.agent_info},
    }
    if g.sync:
        entry["sync"] = g.sync
    if link is not None:
        entry["control"] = {"received": link.received, "malformed": link.decoder.errors,
                            "unsolicited": link.unsolicited, "late": link.late, "not_sent": link.not_sent}
    if g.file is None:
        entry["raw"] = os.path.basename(g.raw)
    try:
        json.dumps(entry, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a bug, not the guest: keep the others' entries
        entry = {"file": g.file, "clock": clock_name(g.clock), "cpus": g.layout.cpus,
                 "protocol": entry["protocol"], "state": g.state,
                 "stats": {"host": stream_stats(g), "agent": {}}, "probes": [], "orders": [],
                 "problems": problems + ["internal error: session entry not serialisable (%s)" % exc]}
    return entry


def write_summary(outdir: str, guests: Iterable[Guest], started_ns: int, stopped_ns: int, stop_reason: str,
                  errors: List[str]) -> Dict[str, Any]:
    """session.json, written whole or not at all; returns its content. A failure to
    write it is added to ``errors`` (the recording's)."""
    doc: Dict[str, Any] = {"layout": "vmtrace-session", "version": 1, "outdir": outdir,
                           "started_ns": started_ns, "stopped_ns": stopped_ns,
                           "stop_reason": stop_reason, "guests": {}, "errors": list(errors)}
    for g in guests:
        entry = guest_entry(g)
        if g.name == HOST_NAME and g.process is not None:
            doc["host"] = dict(entry, clock="mono")
        else:
            doc["guests"][g.name] = entry
    tmp = os.path.join(outdir, "session.json.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
        os.replace(tmp, os.path.join(outdir, "session.json"))
    except OSError as exc:
        errors.append("session.json not written: %s" % exc.strerror)
        doc["errors"] = list(errors)
    return doc
