"""Ring-buffer pages built by hand, record by record, the way the kernel lays them out.

Used by the page decoder's tests (format/test_ringbuffer*.py, test_columns_c.py): they
reach record kinds and corner cases that a real trace shows rarely or never.
"""
from __future__ import annotations

import struct

from vmtrace.format.events import parse_format
from vmtrace.format.ringbuffer import MISSED_EVENTS, MISSED_STORED, layout_from_headers

HEADER_PAGE = (b"\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"
               b"\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;\n"
               b"\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n"
               b"\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;\n")
HEADER_EVENT = (b"# compressed entry header\n\ttype_len    :    5 bits\n\ttime_delta  :   27 bits\n"
                b"\tarray       :   32 bits\n\n\tpadding     : type == 29\n\ttime_extend : type == 30\n"
                b"\ttime_stamp : type == 31\n\tdata max type_len  == 28\n")
LAYOUT = layout_from_headers(HEADER_PAGE, HEADER_EVENT)


class PageBuilder:
    """Writes records the way the kernel's ring buffer lays them out (little endian)."""

    def __init__(self, ts: int):
        self.ts = ts
        self.body = bytearray()

    def _hdr(self, type_len: int, delta: int) -> None:
        self.body += struct.pack("<I", (delta << 5) | type_len)

    def data(self, payload: bytes, delta: int = 0, big: bool = False) -> "PageBuilder":
        payload = payload + b"\0" * (-len(payload) % 4)
        if len(payload) <= 112 and not big:
            self._hdr(len(payload) // 4, delta)
        else:
            self._hdr(0, delta)
            self.body += struct.pack("<I", len(payload) + 4)
        self.body += payload
        return self

    def extend(self, delta: int) -> "PageBuilder":
        self._hdr(30, delta & ((1 << 27) - 1))
        self.body += struct.pack("<I", delta >> 27)
        return self

    def stamp(self, ts: int) -> "PageBuilder":
        self._hdr(31, ts & ((1 << 27) - 1))
        self.body += struct.pack("<I", (ts >> 27) & 0xFFFFFFFF)
        return self

    def discarded(self, nbytes: int, delta: int = 1) -> "PageBuilder":
        self._hdr(29, delta)
        self.body += struct.pack("<I", nbytes - 4) + b"\xee" * (nbytes - 8)
        return self

    def page(self, *, null_pad: bool = False, missed: int = 0, commit: int = None) -> bytes:
        body = bytes(self.body)
        size = len(body) if commit is None else commit
        if null_pad:
            body += struct.pack("<I", 29)  # padding with delta 0: rest of page unused
            size = len(body) if commit is None else commit
        flags = 0
        tail = b""
        if missed:
            flags |= MISSED_EVENTS
            if missed > 0:
                flags |= MISSED_STORED
                tail = struct.pack("<Q", missed)
        # The kernel ORs the flags into a signed long: they arrive sign-extended.
        word = size | flags
        if word & (1 << 31):
            word |= 0xFFFFFFFF00000000
        page = struct.pack("<QQ", self.ts, word) + body + tail
        return page + b"\0" * (4096 - len(page))


def payload(type_id: int, pid: int, extra: bytes = b"") -> bytes:
    return struct.pack("<HBBi", type_id, 0, 0, pid) + extra


# One event type with every kind of field the column decoder handles.
FMT = parse_format(
    "name: fuzz\nID: 1\nformat:\n"
    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
    "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
    "\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;\n"
    "\tfield:__rel_loc u32[] vals;\toffset:12;\tsize:4;\tsigned:0;\n"
    "\tfield:char comm[16];\toffset:16;\tsize:16;\tsigned:0;\n"
    "\tfield:long n;\toffset:32;\tsize:8;\tsigned:1;\n"
    "\nprint fmt: \"%s\", __get_str(name)\n", system="fuzz")
