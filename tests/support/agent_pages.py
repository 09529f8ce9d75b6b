"""A tiny ring-buffer page walker for the agent tests (counts events, checks pages).

Deliberately independent of vmtrace.format: the agent's tests must not trust the
decoder they feed. Layout per header_page/header_event on this kernel: u64 timestamp,
u64 commit (low 30 bits = data bytes; bit 31 = events were lost before this page),
then events with a 32-bit header: type_len 5 bits, time_delta 27 bits.
"""
from __future__ import annotations

import struct
from typing import Dict

PADDING, TIME_EXTEND, TIME_STAMP = 29, 30, 31
MISSED_EVENTS = 1 << 31


def walk(data: bytes, page_size: int = 4096) -> Dict[str, int]:
    """Count events and pages; raise AssertionError on a malformed page."""
    assert len(data) % page_size == 0, "file is not whole pages (%d bytes)" % len(data)
    out = {"pages": 0, "events": 0, "missed_pages": 0, "empty_pages": 0}
    hdr = 16
    for off in range(0, len(data), page_size):
        _ts, commit = struct.unpack_from("<QQ", data, off)
        size = commit & ((1 << 30) - 1)
        assert size <= page_size - hdr, "page at %d: commit %d beyond the page" % (off, size)
        out["pages"] += 1
        if commit & MISSED_EVENTS:
            out["missed_pages"] += 1
        if size == 0:
            out["empty_pages"] += 1
        pos = off + hdr
        end = pos + size
        while pos < end:
            (h,) = struct.unpack_from("<I", data, pos)
            tl = h & 31
            if tl == PADDING:
                if (h >> 5) == 0:
                    break
                (ln,) = struct.unpack_from("<I", data, pos + 4)
                pos += 4 + ln
            elif tl in (TIME_EXTEND, TIME_STAMP):
                pos += 8
            elif tl == 0:
                (ln,) = struct.unpack_from("<I", data, pos + 4)
                pos += 4 + ln
                out["events"] += 1
            else:
                pos += 4 + tl * 4
                out["events"] += 1
        assert pos <= end + 4096, "page at %d: events run past commit" % off
    return out
