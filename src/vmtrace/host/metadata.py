"""The guest's metadata on the host: checked on arrival, completed at the end.

Metadata comes from the guest (untrusted) or, for a seed-style agent that cannot send
any, from a directory the user copied out of the guest's tracefs (``--formats``). In
both cases the result is the raw directory's mapping of relative name -> bytes, with
every name validated and the total size capped before anything is written.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, Iterable, Mapping, Optional

from vmtrace.errors import VmtraceError

REQUIRED = ("header_page", "header_event", "meta.json")
MAX_META_JSON = 1 << 20
_FIELD = re.compile(rb"field:\s*[^;]*?\b(\w+);\s*offset:\s*(\d+);\s*size:\s*(\d+);")
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_metadata(guest: str, files: Mapping[str, bytes], cap: int) -> Dict[str, bytes]:
    """Validate names, sizes and meta.json of what a guest sent; return a plain dict."""
    from vmtrace.format.rawdir import validate_name

    total = 0
    out: Dict[str, bytes] = {}
    for name, data in files.items():
        try:
            validate_name(name)
        except VmtraceError as exc:
            raise VmtraceError("%s: %s" % (guest, exc)) from None
        total += len(data)
        if total > cap:
            raise VmtraceError("%s: metadata over the %d-byte cap (--max-metadata)" % (guest, cap))
        out[name] = bytes(data)
    for name in REQUIRED:
        if name not in out:
            raise VmtraceError("%s: metadata lacks %s" % (guest, name))
    meta = _meta(guest, out["meta.json"])
    ps = meta.get("page_size", 4096)
    if isinstance(ps, bool) or not isinstance(ps, int) or ps < 256 or ps > (1 << 20) or ps & (ps - 1):
        raise VmtraceError("%s: metadata meta.json: bad page_size %r" % (guest, ps))
    return out


def _meta(guest: str, raw: bytes) -> Dict[str, Any]:
    if len(raw) > MAX_META_JSON:
        raise VmtraceError("%s: metadata meta.json is %d bytes (limit %d)" % (guest, len(raw), MAX_META_JSON))
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise VmtraceError("%s: metadata meta.json does not parse" % guest) from None
    if not isinstance(meta, dict):
        raise VmtraceError("%s: metadata meta.json is not an object" % guest)
    return meta


def finish_meta(files: Mapping[str, bytes], guest: str, clock: Optional[str],
                agent_cpus: Optional[Mapping[str, Any]], host: Mapping[str, Mapping[str, Any]]) -> Dict[str, bytes]:
    """meta.json with the final clock and per-CPU stats: the agent's and the host's own.

    Only numbers are carried over from the agent: these become text in the trace.dat's
    CPUSTAT options, and a guest must not be able to put arbitrary text there.
    """
    out = dict(files)
    meta = _meta(guest, out["meta.json"])
    if clock:
        meta["clock"] = clock
    stats: Dict[str, Dict[str, Any]] = {}
    for cpu, hs in host.items():
        entry: Dict[str, Any] = {}
        a = agent_cpus.get(cpu) if isinstance(agent_cpus, Mapping) else None
        if isinstance(a, Mapping):
            for k, v in list(a.items())[:32]:
                if isinstance(k, str) and _SAFE.match(k) and isinstance(v, int) and not isinstance(v, bool):
                    entry[k] = v
        entry["host_received"] = int(hs.get("received", 0))
        entry["host_written"] = int(hs.get("written", 0))
        entry["host_dropped"] = int(hs.get("dropped", 0))
        stats[str(cpu)] = entry
    meta["stats"] = stats
    out["meta.json"] = json.dumps(meta, indent=1, sort_keys=True).encode()
    return out


def _read(path: str, cap: int, what: str) -> bytes:
    try:
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path):
            raise VmtraceError("--formats: %s is not a regular file" % path)
        if st.st_size > cap:
            raise VmtraceError("--formats: %s is over the %d-byte cap" % (path, cap))
        with open(path, "rb") as f:
            return f.read(cap + 1)[:cap]
    except OSError as exc:
        raise VmtraceError("--formats: cannot read %s (%s): %s" % (path, what, exc.strerror)) from None


def _page_info(header_page: bytes) -> Dict[str, int]:
    fields = {m.group(1).decode(): (int(m.group(2)), int(m.group(3))) for m in _FIELD.finditer(header_page)}
    info = {"page_size": 4096, "long_size": 8}
    if "data" in fields:
        off, size = fields["data"]
        info["page_size"] = off + size
    if "commit" in fields:
        info["long_size"] = fields["commit"][1]
    return info


def formats_metadata(directory: str, guest: str, cpus: Iterable[int], clock: str, cap: int) -> Dict[str, bytes]:
    """Metadata for a seed-style agent from a copy of the guest's tracefs (``--formats``).

    Accepts ``DIR`` laid out like tracefs (``DIR/events/header_page``, ``DIR/events/SYS/
    EV/format``, optionally ``DIR/saved_cmdlines``, ``DIR/printk_formats``,
    ``DIR/kallsyms``) or like a raw directory's ``metadata/`` (headers at the top).
    """
    if not os.path.isdir(directory):
        raise VmtraceError("--formats: %s is not a directory" % directory)
    events = os.path.join(directory, "events")
    out: Dict[str, bytes] = {}
    total = 0

    def add(name: str, path: str) -> None:
        nonlocal total
        data = _read(path, cap, name)
        total += len(data)
        if total > cap:
            raise VmtraceError("--formats: %s holds more than the %d-byte cap" % (directory, cap))
        out[name] = data

    for name in ("header_page", "header_event"):
        for cand in (os.path.join(events, name), os.path.join(directory, name)):
            if os.path.isfile(cand):
                add(name, cand)
                break
        else:
            raise VmtraceError("--formats: %s has no %s (copy the guest's tracefs events/ directory)" % (directory, name))
    if os.path.isdir(events):
        for system in sorted(os.listdir(events)):
            sdir = os.path.join(events, system)
            if not _SAFE.match(system) or not os.path.isdir(sdir) or os.path.islink(sdir):
                continue
            for ev in sorted(os.listdir(sdir)):
                fmt = os.path.join(sdir, ev, "format")
                if _SAFE.match(ev) and os.path.isfile(fmt) and re.match(r"^[A-Za-z0-9_]+$", system):
                    add("events/%s/%s/format" % (system, ev), fmt)
    for name in ("saved_cmdlines", "printk_formats", "kallsyms"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            add(name, p)
    cpus = list(cpus)
    meta = {"layout": "vmtrace-raw", "layout_version": 1, "hostname": guest, "cpus": cpus,
            "nr_cpus": len(cpus), "endian": sys.byteorder, "clock": clock,
            "agent": {"version": "seed (plain orders)"}, "stats": {}, "options": {}}
    meta.update(_page_info(out["header_page"]))
    out["meta.json"] = json.dumps(meta, indent=1).encode()
    return out
