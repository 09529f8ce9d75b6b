"""Crafting hostile inputs from a real one, for the tests that feed them to `vmtrace report`.

Every crafted input starts from the small real fixture (tests/data/tracedat_small_v7.dat,
recorded by trace-cmd on a real kernel): its metadata and pages are taken apart into a
raw directory, one thing is changed the way an attacker would change it, and the result
is written back as a raw directory, a trace.dat (v6 or v7, through the project's writer)
or an agent ``-o`` stream. So each test differs from a valid input in exactly the part it
names, and the rest of the decoder runs as it would on a real trace.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping, Optional

from vmtrace.format.tracedat_write import write_tracedat
from vmtrace.sources import open_source, source_metadata

DATA = Path(__file__).resolve().parent.parent / "data"
FIXTURE_V7 = DATA / "tracedat_small_v7.dat"


def base_parts() -> tuple[dict[str, bytes], dict[int, bytes], int]:
    """The fixture's metadata (raw-directory names), its CPUs' page bytes and page size."""
    with open_source(FIXTURE_V7) as src:
        md = source_metadata(src)
        cpus = {c.cpu: b"".join(bytes(p) for p in c.pages()) for c in src.buffers[0].cpus}
        md["meta.json"] = json.dumps({"layout": "vmtrace-raw", "page_size": src.page_size,
                                      "long_size": src.long_size, "endian": "little",
                                      "clock": "local", "nr_cpus": src.nr_cpus}).encode()
        return md, cpus, src.page_size


def event_format_key(md: Mapping[str, bytes], name: str) -> str:
    hits = [k for k in md if k.endswith(f"/{name}/format")]
    assert len(hits) == 1, hits
    return hits[0]


def with_print_fmt(md: Mapping[str, bytes], event: str, print_fmt: str) -> dict[str, bytes]:
    """``md`` with ``event``'s ``print fmt:`` line replaced."""
    key = event_format_key(md, event)
    lines = md[key].decode().splitlines()
    lines = [f"print fmt: {print_fmt}" if l.startswith("print fmt:") else l for l in lines]
    out = dict(md)
    out[key] = ("\n".join(lines) + "\n").encode()
    return out


def with_extra_field(md: Mapping[str, bytes], event: str, field_line: str) -> dict[str, bytes]:
    """``md`` with one more field line (``field:...;offset:...;``) in ``event``'s format."""
    key = event_format_key(md, event)
    text = md[key].decode()
    head, sep, tail = text.partition("\nprint fmt:")
    out = dict(md)
    out[key] = (head.rstrip("\n") + "\n" + field_line + "\n" + sep + tail).encode()
    return out


def write_raw(dest: Path, md: Mapping[str, bytes], cpus: Mapping[int, bytes]) -> Path:
    """A raw directory, written plainly (no name validation: the point is hostile names)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in md.items():
        p = dest / "metadata" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for cpu, data in cpus.items():
        (dest / f"cpu{cpu}").write_bytes(data)
    return dest


def write_dat(dest: Path, md: Mapping[str, bytes], cpus: Mapping[int, bytes], *, version: int = 7,
              compression: Optional[str] = "zstd") -> Path:
    """The same parts as a trace.dat, through the project's own writer."""
    raw = write_raw(dest.with_suffix(".src"), md, cpus)
    files = {cpu: str(raw / f"cpu{cpu}") for cpu in cpus}
    write_tracedat(dest, md, files, version=version, compression=compression)
    return dest


def stream_frame(mtype: int, fields: dict, blob: bytes = b"") -> bytes:
    """One protocol frame as the agent's ``-o`` stream carries it."""
    from vmtrace import protocol
    body = json.dumps(fields).encode()
    return protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, mtype, 0, len(body), len(blob)) \
        + body + blob


def section_headers(blob: bytes) -> dict[int, int]:
    """v7: section id -> file offset of every section the options point at (plus options)."""
    endian = "<"
    pos = 10 + blob[10:].index(b"\0") + 1 + 2 + 4
    pos = blob.index(b"\0", pos) + 1
    pos = blob.index(b"\0", pos) + 1
    first = struct.unpack_from(endian + "Q", blob, pos)[0]
    return {"options": first, "options_end": pos}


def size_of(path: Path) -> int:
    return os.path.getsize(path) if path.is_file() else sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file())
