"""The host's scheduler record of QEMU's vCPU threads, as the recorder keeps it.

The recorder (:mod:`vmtrace.host.vcpusync`) reads a tracefs instance of its own, in the
kernel's text format (``trace_pipe``), holding only ``sched_switch`` events that switch
a vCPU thread in or out, ``sched_wakeup`` of (or by) those threads, and its own
``vmtrace-anchor seq=N`` trace_marker lines. This module reads that file back: it is
input like any other file handed to ``vmtrace check`` (lines and counts bounded, bad
lines counted, never trusted to be well formed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Set, Tuple

from vmtrace.clocksync.containment import HostSwitch
from vmtrace.errors import VmtraceError

MAX_LINE = 1024
MAX_LINES = 20_000_000
_LINE = re.compile(r"^\s*(?P<comm>.*?)-(?P<tid>\d{1,10})\s+\[(?P<cpu>\d{1,5})\]\s+(?:\S+\s+)?"
                   r"(?P<ts>\d{1,20}): (?P<ev>\w+): (?P<rest>.*)$")
_KV = re.compile(r"(\w+)=(\S*)")
_ANCHOR = re.compile(r"vmtrace-anchor seq=(\d{1,12})\b")


@dataclass
class HostSched:
    """Parsed records: ``switches`` of the watched threads (time order), ``anchors``
    seq -> host trace-clock stamp of the recorder's marker, and ``bad`` lines."""

    switches: List[HostSwitch] = field(default_factory=list)
    anchors: Dict[int, int] = field(default_factory=dict)
    bad: int = 0
    lines: int = 0
    first: int = 0
    last: int = 0


def parse(lines: Iterable[str], tids: Iterable[int]) -> HostSched:
    """Records of threads ``tids`` from the text lines of a tracefs instance."""
    want: Set[int] = set(tids)
    hs = HostSched()
    for line in lines:
        hs.lines += 1
        if hs.lines > MAX_LINES:
            raise VmtraceError("host scheduler record has more than %d lines" % MAX_LINES)
        if line.startswith("#") or not line.strip():
            continue
        if len(line) > MAX_LINE:
            hs.bad += 1
            continue
        m = _LINE.match(line)
        if not m:
            hs.bad += 1
            continue
        ts, tid, ev, rest = int(m.group("ts")), int(m.group("tid")), m.group("ev"), m.group("rest")
        hs.first = ts if not hs.first else min(hs.first, ts)
        hs.last = max(hs.last, ts)
        if ev == "sched_switch":
            kv = dict(_KV.findall(rest))
            try:
                pp, np_ = int(kv["prev_pid"]), int(kv["next_pid"])
            except (KeyError, ValueError):
                hs.bad += 1
                continue
            if pp in want:
                hs.switches.append(HostSwitch(ts, pp, "out", kv.get("prev_state", ""),
                                              _next_comm(rest) + "-%d" % np_))
            if np_ in want:
                hs.switches.append(HostSwitch(ts, np_, "in"))
        elif ev == "sched_wakeup":
            kv = dict(_KV.findall(rest))
            try:
                pid = int(kv["pid"])
            except (KeyError, ValueError):
                hs.bad += 1
                continue
            if pid in want:
                hs.switches.append(HostSwitch(ts, pid, "wakeup"))
            if tid in want and tid != pid:
                hs.switches.append(HostSwitch(ts, tid, "own"))
        elif ev == "tracing_mark_write" or ev == "print":
            a = _ANCHOR.search(rest)
            if a:
                hs.anchors.setdefault(int(a.group(1)), ts)
        elif tid in want:
            hs.switches.append(HostSwitch(ts, tid, "own"))
    hs.switches.sort(key=lambda r: r.ts)
    return hs


def _next_comm(rest: str) -> str:
    """next_comm may hold spaces ("CPU 0/TCG"): take it between its key and next_pid."""
    a = rest.find("next_comm=")
    b = rest.find(" next_pid=", a)
    return rest[a + 10:b] if a >= 0 and b > a else "?"


def read(path: str, tids: Iterable[int]) -> HostSched:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return parse(f, tids)
    except OSError as exc:
        raise VmtraceError("%s: unreadable: %s" % (path, exc.strerror)) from None


def thread_map(raw: object, where: str) -> Dict[int, int]:
    """session.json's ``vcpu_threads`` {"cpu": tid}, checked."""
    if not isinstance(raw, dict) or not raw or len(raw) > 4096:
        raise VmtraceError("%s: vcpu_threads must be a non-empty object {cpu: host thread id}" % where)
    out = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 5) or \
                type(v) is not int or not 0 < v < (1 << 31):
            raise VmtraceError("%s: bad vcpu_threads entry %.40r: %.40r" % (where, k, v))
        out[int(k)] = v
    return out


def anchors_from(raw: object, where: str) -> List[Tuple[int, int, int]]:
    """session.json's ``anchors`` [[seq, mono_before, mono_after]], checked."""
    if not isinstance(raw, list) or len(raw) > 1 << 20:
        raise VmtraceError("%s: anchors must be a list" % where)
    out = []
    for a in raw:
        if not (isinstance(a, list) and len(a) == 3 and all(type(x) is int and 0 <= x < (1 << 63) for x in a)
                and a[1] <= a[2]):
            raise VmtraceError("%s: bad anchor %.60r (want [seq, mono_before_ns, mono_after_ns])" % (where, a))
        out.append((a[0], a[1], a[2]))
    return out
