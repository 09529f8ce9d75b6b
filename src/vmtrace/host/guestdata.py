"""Every value a guest sends, checked for type, shape and range before anything uses it.

A guest is untrusted: its agent may be replaced by anything that speaks the protocol.
The recorder therefore never keeps a reply as it came. Each kind of reply (hello,
stats, time probe, meta.json) goes through one function here that returns a *cleaned*
copy built from checked pieces, or raises/returns None; whatever is not understood is
left out. The generic checks live in :mod:`vmtrace.values`, where the analysis side uses them
to read back session.json (:mod:`vmtrace.session`), a file anyone may hand to
``vmtrace check``.

Guest-supplied text (hostname, kernel release, agent version...) is kept only as
*guest data*: sanitised, length-capped, and stored apart from the host's facts (the
guest's name on the host, its clock, its CPU count), never in their place. See
docs/host.md, "Untrusted guests".

Standard library only.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from vmtrace.errors import VmtraceError
from vmtrace.values import (MAX_CPUS, MAX_TEXT, NS_MAX, U64_MAX, clock_name, cpu_list, is_int,  # noqa: F401
                            short, text, token)

# Counters per CPU in a stats reply: the agent sends 10; room for more, not for a flood.
MAX_STAT_KEYS = 32
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}\Z")
_CPU_KEY = re.compile(r"^(0|[1-9][0-9]{0,5})\Z")


def _scalar(value: Any) -> Any:
    """An informational guest value as guest data: short text, a 64-bit number, a bool."""
    if isinstance(value, bool) or value is None:
        return value
    if type(value) is int:
        return value if -NS_MAX - 1 <= value <= U64_MAX else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return text(value)
    if isinstance(value, list) and len(value) <= MAX_CPUS and all(is_int(v, 0, U64_MAX) for v in value):
        return list(value)
    return None


def guest_info(fields: Mapping[str, Any], keys: Tuple[str, ...]) -> Dict[str, Any]:
    """The informational fields ``keys`` of a reply, as guest data (unusable ones left out)."""
    out: Dict[str, Any] = {}
    for k in keys:
        if k in fields:
            v = _scalar(fields[k])
            if v is not None or fields[k] is None:
                out[k] = v
    return out


HELLO_INFO = ("protocol", "agent_version", "kernel", "hostname", "machine", "nr_cpus", "offline",
              "page_size", "long_size", "endian", "clock", "instance", "buffer_size_kb",
              "buffer_percent", "running", "python", "splice")


def check_hello(fields: Mapping[str, Any]) -> Tuple[List[int], Dict[str, Any]]:
    """(traced CPUs, guest data) of a hello reply; VmtraceError if ``cpus`` is unusable.

    Only ``cpus`` steers the recorder (which ports to expect pages on); everything else
    is kept as the guest's own account of itself.
    """
    cpus = cpu_list(fields.get("cpus"), "hello: 'cpus'")
    return cpus, guest_info(fields, HELLO_INFO)


def check_cpu_stats(value: Any, ports: int) -> Optional[Dict[str, Dict[str, Any]]]:
    """Per-CPU counters ``{"N": {name: count}}`` cleaned, or None if the shape is wrong.

    Counters are integers in 0..2^64-1 under identifier names; ``error`` may be text.
    CPUs without a prepared port are left out (their pages cannot have arrived).
    """
    if not isinstance(value, dict) or len(value) > MAX_CPUS:
        return None
    out: Dict[str, Dict[str, Any]] = {}
    for cpu, counters in value.items():
        if not isinstance(cpu, str) or not _CPU_KEY.match(cpu) or not isinstance(counters, dict):
            return None
        if len(counters) > MAX_STAT_KEYS:
            return None
        entry: Dict[str, Any] = {}
        for k, v in counters.items():
            if not isinstance(k, str) or not _KEY.match(k):
                return None
            if k == "error" and (v is None or isinstance(v, str)):
                entry[k] = text(v) if v is not None else None
            elif is_int(v, 0, U64_MAX):
                entry[k] = v
            else:
                return None
        if int(cpu) < ports:
            out[cpu] = entry
    return out


AGENT_INFO = ("version", "pid", "python", "splice", "cpu_time_s", "pump_cpus")


def check_stats(fields: Mapping[str, Any], ports: int) -> Optional[Dict[str, Any]]:
    """A stats reply ``{"cpus": ..., "agent": ..., "running": ...}`` cleaned, or None."""
    cpus = check_cpu_stats(fields.get("cpus"), ports)
    if cpus is None:
        return None
    agent = fields.get("agent")
    running = fields.get("running")
    return {"cpus": cpus, "agent": guest_info(agent, AGENT_INFO) if isinstance(agent, dict) else {},
            "running": running if isinstance(running, bool) else None}


def check_probe(fields: Mapping[str, Any], seq: int) -> Optional[int]:
    """The guest's clock reading of a time probe reply to probe ``seq``, or None.

    A reading must be a non-negative int64, and a reply that echoes another seq is not
    this probe's (pairing it would put a wrong point into the clock fit).
    """
    gns = fields.get("guest_ns")
    if not is_int(gns, 0, NS_MAX):
        return None
    if "seq" in fields and fields["seq"] != seq:
        return None
    return gns


META_INFO = ("hostname", "kernel", "machine", "clock", "instance", "nr_cpus", "cpus", "offline_cpus",
             "uname", "date", "offset", "hook", "trace_clock")


def check_meta(meta: Mapping[str, Any], guest: str) -> Dict[str, Any]:
    """The parts of a guest's meta.json the recorder uses, checked, plus guest data.

    Returns ``{"page_size", "long_size", "endian", "clock", "cpus", "kernel",
    "machine", "agent_version", "guest": {...}}``; VmtraceError (naming the guest and
    the field) for a structural value that is out of range, since the trace.dat cannot
    be written right without it.
    """
    def bad(key: str, why: str) -> VmtraceError:
        return VmtraceError("%s: metadata meta.json: %s %s %s" % (guest, key, short(meta.get(key)), why))

    ps = meta.get("page_size", 4096)
    if not is_int(ps, 256, 1 << 20) or ps & (ps - 1):
        raise bad("page_size", "is not a power of two in 256..1 MiB")
    ls = meta.get("long_size", 8)
    if ls not in (4, 8) or type(ls) is not int:
        raise bad("long_size", "is not 4 or 8")
    endian = meta.get("endian", "little")
    if endian not in ("little", "big"):
        raise bad("endian", "is not little or big")
    if "nr_cpus" in meta and not is_int(meta["nr_cpus"], 0, MAX_CPUS):
        raise bad("nr_cpus", "is not a CPU count (0..%d)" % MAX_CPUS)
    cpus = cpu_list(meta["cpus"], "%s: metadata meta.json: cpus" % guest) if "cpus" in meta else None
    clock = meta.get("clock")
    if clock is not None and clock_name(clock) is None:
        raise bad("clock", "is not a trace clock name")
    agent = meta.get("agent") if isinstance(meta.get("agent"), dict) else {}
    info = guest_info(meta, META_INFO)
    if isinstance(agent.get("version"), str):
        info["agent_version"] = text(agent["version"])
    return {"page_size": ps, "long_size": ls, "endian": endian, "clock": clock, "cpus": cpus,
            "kernel": token(meta.get("kernel")), "machine": token(meta.get("machine")),
            "agent_version": token(agent.get("version")), "guest": info}
