"""What a host needs besides the pages to decode them: the guest's own description.

The seed sent only pages and left the user to copy event formats out of the guest by
hand. Here the agent gathers them, named exactly as in the raw directory layout of
docs/internals.md, so the same bytes can be written to ``--output-dir``, framed into the
``-o`` stream, or sent in the protocol's ``metadata`` message.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import sys
from typing import Any, Dict, Iterable, List, Optional, Set

from vmtrace.tracefs import Tracefs, kallsyms, kernel_release

LAYOUT_VERSION = 1


def _systems(enabled: Iterable[str]) -> Set[str]:
    out = set()
    for spec in enabled:
        system = spec.split(":", 1)[0].strip()
        if system:
            out.add(system)
    return out


def event_formats(tf: Tracefs, extra: Iterable[str] = ()) -> Dict[str, bytes]:
    """Formats of every event in each system that has an enabled event (plus markers).

    Whole systems rather than just the enabled events, because a host that later
    enables more events of a system still finds their formats; the cost is a few KB.
    """
    systems = _systems(tf.enabled_events()) | set(extra) | {"ftrace"}
    files: Dict[str, bytes] = {}
    for system in sorted(systems):
        try:
            events = tf.system_events(system)
        except Exception:  # noqa: BLE001 - a system that vanished is simply skipped
            continue
        for event in events:
            if system == "ftrace" and event != "print":
                continue
            name = "events/%s/%s/format" % (system, event)
            try:
                files[name] = tf.event_format(system, event)
            except Exception:  # noqa: BLE001
                continue
    return files


def long_size() -> int:
    """The guest *kernel's* long: 8 on 64-bit machines even under a 32-bit Python."""
    machine = os.uname().machine
    if machine.endswith("64") or machine in ("s390x",):
        return 8
    return struct.calcsize("l")


def meta(
    tf: Tracefs,
    cpus: List[int],
    offline: List[int],
    page_size: int,
    agent: Dict[str, Any],
    options: Dict[str, Any],
    stats: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    possible = cpus + offline
    return {
        "layout": "vmtrace-raw",
        "layout_version": LAYOUT_VERSION,
        "kernel": kernel_release(),
        "hostname": os.uname().nodename,
        "machine": os.uname().machine,
        "cpus": cpus,
        "offline_cpus": offline,
        "nr_cpus": (max(possible) + 1) if possible else 0,
        "page_size": page_size,
        "long_size": long_size(),
        "endian": sys.byteorder,
        "clock": tf.clock,
        "instance": tf.instance,
        "agent": agent,
        "stats": stats or {},
        "options": options,
    }


KALLSYMS_RAW_MAX = 16 << 20


def collect(
    tf: Tracefs,
    meta_obj: Dict[str, Any],
    with_kallsyms: bool = True,
) -> Dict[str, bytes]:
    """All metadata files, by relative name."""
    files: Dict[str, bytes] = {
        "header_page": tf.header_page(),
        "header_event": tf.header_event(),
        "saved_cmdlines": tf.saved_cmdlines(),
        "printk_formats": tf.printk_formats(),
        "meta.json": json.dumps(meta_obj, indent=1, sort_keys=True).encode(),
    }
    files.update(event_formats(tf))
    if with_kallsyms:
        try:
            syms = kallsyms()
            # Sent as it is: compressing 5 MB cost the guest 50-70 ms of CPU (a fifth of
            # a 2 s recording's whole cost), copying it into the port almost nothing; the
            # host compresses the trace.dat. Only a table too large for one control
            # frame beside the other files is compressed.
            if len(syms) <= KALLSYMS_RAW_MAX:
                files["kallsyms"] = syms
            else:
                files["kallsyms.gz"] = gzip.compress(syms, compresslevel=1)
        except Exception as exc:  # noqa: BLE001 - symbols are nice to have, not required
            print("vmtrace-agent: no kallsyms: %s" % exc, file=sys.stderr)
    return files
