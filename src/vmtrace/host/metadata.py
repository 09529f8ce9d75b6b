"""The guest's metadata on the host: checked on arrival, completed at the end.

Metadata comes from the guest (untrusted) or, for a seed-style agent that cannot send
any, from a directory the user copied out of the guest's tracefs (``--formats``). In
both cases the result is the raw directory's mapping of relative name -> bytes, with
every name validated and the total size capped before anything is written.
"""
from __future__ import annotations

import json
import re
import sys
import zlib
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from vmtrace.errors import VmtraceError
from vmtrace.format.tracefscopy import page_info, read_tracefs_copy
from vmtrace.host.guestdata import check_meta
from vmtrace.protocol import ProtocolError, loads

REQUIRED = ("header_page", "header_event", "meta.json")
MAX_META_JSON = 1 << 20
# Each metadata file becomes a file in the spool: a kernel has ~2500 event formats.
MAX_METADATA_FILES = 8192
# /proc/kallsyms of a distro kernel with modules is 5-20 MB (1-3 MB gzipped). The
# trace.dat writer holds it expanded in memory, so the expanded size is bounded here,
# on arrival, by streaming through it, before the guest's recording even starts.
MAX_KALLSYMS = 64 << 20
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


def check_metadata(guest: str, files: Mapping[str, bytes], cap: int) -> Tuple[Dict[str, bytes], Dict[str, Any]]:
    """Validate names, count, sizes, kallsyms and meta.json of what a guest sent.

    Returns the files as a plain dict and meta.json's checked content
    (:func:`vmtrace.host.guestdata.check_meta`); VmtraceError naming the guest otherwise.
    """
    from vmtrace.format.rawdir import validate_name

    if len(files) > MAX_METADATA_FILES:
        raise VmtraceError("%s: metadata has %d files (limit %d)" % (guest, len(files), MAX_METADATA_FILES))
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
    meta = check_meta(_meta(guest, out["meta.json"]), guest)
    if "kallsyms" in out and len(out["kallsyms"]) > MAX_KALLSYMS:
        raise VmtraceError("%s: metadata kallsyms is over %d bytes" % (guest, MAX_KALLSYMS))
    if "kallsyms.gz" in out:
        _check_gzip(guest, out["kallsyms.gz"], MAX_KALLSYMS)
    return out, meta


def _check_gzip(guest: str, data: bytes, limit: int) -> None:
    """Expand the gzip stream piecewise, keeping nothing, to learn that it is valid and
    expands to at most ``limit`` bytes (its header's size field is the guest's word)."""
    d = zlib.decompressobj(wbits=31)
    size = 0
    pending = data
    try:
        while pending and not d.eof:
            size += len(d.decompress(pending, 1 << 20))
            pending = d.unconsumed_tail
            if size > limit:
                raise VmtraceError("%s: metadata kallsyms.gz expands past %d bytes" % (guest, limit))
        size += len(d.flush())
    except zlib.error as exc:
        raise VmtraceError("%s: metadata kallsyms.gz is not valid gzip (%s)" % (guest, exc)) from None
    if size > limit:
        raise VmtraceError("%s: metadata kallsyms.gz expands past %d bytes" % (guest, limit))
    if not d.eof:
        raise VmtraceError("%s: metadata kallsyms.gz is truncated" % guest)


def _meta(guest: str, raw: bytes) -> Dict[str, Any]:
    if len(raw) > MAX_META_JSON:
        raise VmtraceError("%s: metadata meta.json is %d bytes (limit %d)" % (guest, len(raw), MAX_META_JSON))
    try:
        meta = loads(raw, "metadata meta.json")
    except ProtocolError as exc:
        raise VmtraceError("%s: %s" % (guest, exc.what)) from None
    if not isinstance(meta, dict):
        raise VmtraceError("%s: metadata meta.json is not an object" % guest)
    return meta


def finish_meta(files: Mapping[str, bytes], guest: str, meta: Mapping[str, Any], clock: Optional[str],
                ports: int, agent_cpus: Optional[Mapping[str, Any]],
                host: Mapping[str, Mapping[str, Any]]) -> Dict[str, bytes]:
    """meta.json as the host writes it: the host's facts, the checked structure, numbers.

    Built from scratch rather than edited, so nothing the guest put in its own meta.json
    reaches the spool or the trace.dat except the checked fields: the name is the
    guest's name on this host, the CPU count is its port count, the clock the one
    recorded; the guest's own account of itself sits under ``"guest"``. Only numbers
    are carried over from the agent's statistics: they become text in the trace.dat's
    CPUSTAT options.
    """
    out = dict(files)
    stats: Dict[str, Dict[str, Any]] = {}
    for cpu, hs in host.items():
        entry: Dict[str, Any] = {}
        a = agent_cpus.get(cpu) if isinstance(agent_cpus, Mapping) else None
        if isinstance(a, Mapping):
            for k, v in list(a.items())[:32]:
                if isinstance(k, str) and _SAFE.match(k) and type(v) is int:
                    entry[k] = v
        entry["host_received"] = int(hs.get("received", 0))
        entry["host_written"] = int(hs.get("written", 0))
        entry["host_dropped"] = int(hs.get("dropped", 0))
        stats[str(cpu)] = entry
    cpus = [c for c in (meta.get("cpus") or range(ports)) if c < ports]
    doc: Dict[str, Any] = {
        "layout": "vmtrace-raw", "layout_version": 1,
        "hostname": guest, "kernel": meta.get("kernel") or "unknown",
        "cpus": cpus, "nr_cpus": ports,
        "page_size": meta.get("page_size", 4096), "long_size": meta.get("long_size", 8),
        "endian": meta.get("endian", "little"), "clock": clock or meta.get("clock") or "local",
        "stats": stats, "guest": dict(meta.get("guest") or {}),
    }
    if meta.get("machine"):
        doc["machine"] = meta["machine"]
    if meta.get("agent_version"):
        doc["agent"] = {"version": meta["agent_version"]}
    out["meta.json"] = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()
    return out


def formats_metadata(directory: str, guest: str, cpus: Iterable[int], clock: str, cap: int) -> Dict[str, bytes]:
    """Metadata for a seed-style agent from a copy of the guest's tracefs (``--formats``):
    the copy's files (:func:`vmtrace.format.tracefscopy.read_tracefs_copy`) and a
    meta.json made by the host."""
    out = read_tracefs_copy(directory, cap)
    cpus = list(cpus)
    meta = {"layout": "vmtrace-raw", "layout_version": 1, "hostname": guest, "cpus": cpus,
            "nr_cpus": len(cpus), "endian": sys.byteorder, "clock": clock,
            "agent": {"version": "seed (plain orders)"}, "stats": {}, "options": {}}
    meta.update(page_info(out["header_page"]))
    out["meta.json"] = json.dumps(meta, indent=1).encode()
    return out
