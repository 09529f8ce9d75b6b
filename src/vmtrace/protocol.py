"""The control channel between the host and the guest agent, and its byte framing.

Standard library only, Python 3.9+: the agent imports it inside guests. See
docs/protocol.md for the wire format; this module is its only implementation, so the
host (``vmtrace record``) and the agent cannot drift apart.

Why a framed protocol on the seed's control port: the 2012 agent understood only the
bytes ``1`` and ``0``, so the host could not learn the guest's CPUs, clocks or event
formats, nor ask for statistics or a time probe. Frames start with the magic ``VMTR``,
which can never be mistaken for a plain order, so one decoder accepts both: an old host
that writes ``echo 1 > agent-ctl-path.in`` keeps working, and a new host finds out
whether the agent is new by sending HELLO and waiting for the reply (an old agent says
nothing).

Everything read from the peer is untrusted: sizes are bounded before anything is
buffered, and every problem becomes a :class:`ProtocolError` (a one-line
``FormatError`` naming the stream offset), never an exception from ``json`` or
``struct``.
"""
from __future__ import annotations

import json
import math
import re
import struct
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from vmtrace.errors import FormatError

MAGIC = b"VMTR"
VERSION = 1
# magic, version, type, flags (reserved, 0), JSON length, blob length; little endian.
HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = HEADER.size  # 16

MAX_JSON = 1 << 20  # a control message's JSON part
MAX_BLOB = 64 << 20  # metadata (kallsyms.gz is a few MB) and -o page chunks (<= 1 MiB)
MAX_LINE = 256  # a plain order line; longer lines are garbage
MAX_NAME = 255  # a metadata name: each part becomes a file name, which Linux caps at 255
# Every number in a message is an id, a seq, a counter or a nanosecond timestamp: a
# 64-bit integer. Larger literals (10**4000 parses in Python, then breaks numpy, struct
# and float conversions far from here) and non-finite floats are refused while parsing.
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1

# Plain orders of the 2012 agent, as `echo 1 > agent-ctl-path.in` writes them.
PLAIN_START = b"1\n"
PLAIN_STOP = b"0\n"

# Message types. Requests go host -> agent; OK/ERROR and the agent's HELLO, METADATA,
# STATS and TIME_PROBE replies go agent -> host. PAGES and END appear only in the -o stream.
HELLO = 1
CONFIGURE = 2
METADATA = 3
START = 4
STOP = 5
STATS = 6
TIME_PROBE = 7
BYE = 8
OK = 9
ERROR = 10
PAGES = 16
END = 17

NAMES = {
    HELLO: "hello",
    CONFIGURE: "configure",
    METADATA: "metadata",
    START: "start",
    STOP: "stop",
    STATS: "stats",
    TIME_PROBE: "time_probe",
    BYE: "bye",
    OK: "ok",
    ERROR: "error",
    PAGES: "pages",
    END: "end",
}
TYPES = {v: k for k, v in NAMES.items()}

# Relative metadata names a guest may send (docs/internals.md); anything else is refused
# before a host writes it to disk. \Z, not $: "$" also matches before a final newline.
METADATA_NAME = re.compile(
    r"^(header_page|header_event|saved_cmdlines|printk_formats|kallsyms(\.gz)?|meta\.json"
    r"|events/[A-Za-z0-9_]+/[A-Za-z0-9_.-]+/format)\Z"
)


def metadata_name_ok(name: Any) -> bool:
    """The one rule for a metadata file's name, wherever one is read or written (the
    protocol, the ``-o`` stream, raw directories): the pattern above, and no ``.`` or
    ``..`` component, which the pattern alone would let through as an event name."""
    return (isinstance(name, str) and METADATA_NAME.match(name) is not None
            and not any(part in (".", "..") for part in name.split("/")))


# The agent's ``-o`` stream: this line, then frames as on the control port (docs/agent.md).
STREAM_MAGIC = b"VMTRACE-STREAM 1\n"
# A stream names its CPUs; past this it is not a machine's (the unpacker opens a file per CPU).
STREAM_MAX_CPU = 4096


class ProtocolError(FormatError):
    """A frame or order that does not parse; the stream offset says where."""


class Message:
    """One framed message: a type, a JSON object of fields and an optional binary blob.

    A decoded message also says what it cost on the wire (``size``) and how many blob
    bytes the receiver chose not to keep (``blob_dropped``, see :class:`Decoder`), so a
    receiver can account for a peer's traffic in bytes, not in messages.
    """

    __slots__ = ("type", "fields", "blob", "size", "blob_dropped")

    def __init__(self, type: int, fields: Optional[Mapping[str, Any]] = None, blob: bytes = b"",
                 size: int = 0, blob_dropped: int = 0):
        if type not in NAMES:
            raise ProtocolError("unknown message type %d" % type)
        self.type = type
        self.fields = dict(fields or {})
        self.blob = blob
        self.size = size
        self.blob_dropped = blob_dropped

    @property
    def name(self) -> str:
        return NAMES[self.type]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Message)
            and (self.type, self.fields, bytes(self.blob)) == (other.type, other.fields, bytes(other.blob))
        )

    def __repr__(self) -> str:
        return "Message(%s, %r%s)" % (self.name, self.fields, ", blob=%d bytes" % len(self.blob) if self.blob else "")


class Order:
    """A plain seed order: ``start`` for ``1``, ``stop`` for ``0``."""

    __slots__ = ("start",)

    def __init__(self, start: bool):
        self.start = start

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Order) and other.start == self.start

    def __repr__(self) -> str:
        return "Order(%s)" % ("1" if self.start else "0")


Item = Union[Message, Order, ProtocolError]


def encode(msg: Message) -> bytes:
    """Frame a message: 16-byte header, JSON object, blob."""
    body = json.dumps(msg.fields, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(body) > MAX_JSON:
        raise ProtocolError("%s message JSON too large (%d bytes)" % (msg.name, len(body)))
    if len(msg.blob) > MAX_BLOB:
        raise ProtocolError("%s message blob too large (%d bytes)" % (msg.name, len(msg.blob)))
    return HEADER.pack(MAGIC, VERSION, msg.type, 0, len(body), len(msg.blob)) + body + bytes(msg.blob)


def header(type: int, fields: Mapping[str, Any], blob_len: int) -> bytes:
    """Header and JSON of a frame whose blob the caller writes itself (zero-copy -o pages)."""
    body = json.dumps(dict(fields), separators=(",", ":"), sort_keys=True).encode("utf-8")
    if blob_len > MAX_BLOB:
        raise ProtocolError("blob too large (%d bytes)" % blob_len)
    return HEADER.pack(MAGIC, VERSION, type, 0, len(body), blob_len) + body


def msg(name: str, blob: bytes = b"", **fields: Any) -> Message:
    """Build a message by name: ``msg("stats", seq=3)``."""
    try:
        return Message(TYPES[name], fields, blob)
    except KeyError:
        raise ProtocolError("unknown message name %r" % name) from None


class _Number(ValueError):
    pass


# Any text that could hold a number outside int64..u64 or a non-finite float: 19 digits
# in a row (-9999999999999999999 is below int64), a three-digit exponent. JSON with
# none of them (almost all of it) is parsed at C speed; the rest through the exact
# Python hooks below, which cost ~6x as much (130 ms for a MiB of small integers).
_SUSPECT = re.compile(r"[0-9]{19}|[eE][+-]?[0-9]{3}")


def _parse_int(text: str) -> int:
    # 21 characters hold every 64-bit value; checking the length first keeps a
    # 4000-digit literal from costing a quadratic conversion before it is refused.
    if len(text) > 21:
        raise _Number(text[:24])
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise _Number(text)
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Number(text[:24])
    return value


def _parse_constant(text: str) -> Any:
    raise _Number(text)  # NaN, Infinity, -Infinity: not JSON, and not a number we can use


def loads(data: Union[bytes, str], what: str = "message JSON", offset: Optional[int] = None) -> Any:
    """JSON from the peer (or a file it shaped): UTF-8, numbers within 64 bits and finite.

    Raises ProtocolError naming ``what``; never ValueError, RecursionError or a number
    that breaks int64 arithmetic later.
    """
    try:
        raw = bytes(data) if isinstance(data, (bytearray, memoryview)) else data
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if _SUSPECT.search(text) is None:
            # no token that could be out of range: json's C number parsing is exact
            return json.loads(text, parse_constant=_parse_constant)
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except _Number as exc:
        raise ProtocolError("%s has a number outside 64 bits or not finite (%s...)" % (what, exc),
                            offset=offset) from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("%s does not parse" % what, offset=offset) from None


def _parse_fields(data: bytes, offset: int) -> Dict[str, Any]:
    obj = loads(data, offset=offset)
    if not isinstance(obj, dict):
        raise ProtocolError("message JSON is not an object", offset=offset)
    return obj


# What a receiver says about a frame's blob once it has the frame's JSON:
# keep_blob(type, fields, blob_length) -> keep it? A refused blob is skipped as it
# arrives, never buffered.
KeepBlob = Callable[[int, Dict[str, Any], int], bool]


class _Bad:
    """A malformed item, made into a ProtocolError only if it is reported (the first of
    a run): building exceptions was most of the cost of a stream of bad headers."""

    __slots__ = ("what", "offset")

    def __init__(self, what: str, offset: int):
        self.what = what
        self.offset = offset


class _Frame:
    """A frame whose header and JSON are parsed and whose blob is still arriving."""

    __slots__ = ("type", "fields", "blen", "left", "blob", "size")

    def __init__(self, mtype: int, fields: Union[Dict[str, Any], _Bad], blen: int, keep: bool,
                 size: int):
        self.type = mtype
        self.fields = fields
        self.blen = blen
        self.left = blen
        self.blob: Optional[bytearray] = bytearray() if keep else None
        self.size = size


class Decoder:
    """Incremental decoder for a byte stream of frames (and, if allowed, plain orders).

    ``feed(data)`` returns the complete items found so far: :class:`Message`,
    :class:`Order`, or a :class:`ProtocolError` for something malformed, after which the
    decoder has already resynchronised (it skips to the next frame magic or line end),
    so one bad write never poisons the rest of the session. A run of errors within one
    ``feed`` is reported once (``errors`` counts them all): a peer sending a megabyte of
    bad headers must not make the receiver build a hundred thousand exceptions.

    Memory is bounded by HEADER_SIZE + ``max_json`` + the largest blob kept + one
    ``feed``: a frame's JSON is parsed as soon as it is complete, a frame whose JSON is
    over ``max_json`` is skipped unparsed, and a blob longer than ``max_blob``, or one
    that ``keep_blob`` refuses, is skipped as it streams past (the message is still
    delivered, ``blob_dropped`` saying how many bytes were skipped). Work is linear in
    the bytes fed, whatever they are; one frame's parse is the largest single step.

    The agent uses ``allow_orders=True`` (the control port carries both forms); the host
    uses ``allow_orders=False`` (the agent only ever sends frames).
    """

    def __init__(self, allow_orders: bool = True, source: str = "control stream",
                 max_blob: int = MAX_BLOB, keep_blob: Optional[KeepBlob] = None, max_json: int = MAX_JSON):
        self.allow_orders = allow_orders
        self.source = source
        self.max_json = min(max_json, MAX_JSON)
        self.max_blob = min(max_blob, MAX_BLOB)
        self.keep_blob = keep_blob
        self.errors = 0  # every malformed item, also those folded into one report
        # malformed frames by the type byte of their (well-formed) header: a receiver
        # waiting for a reply of that type knows it will not come
        self.bad_frames: Dict[int, int] = {}
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]
        self._cur: Optional[_Frame] = None

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame or line."""
        cur = self._cur
        return len(self._buf) + (len(cur.blob) if cur is not None and cur.blob is not None else 0)

    @property
    def in_frame(self) -> bool:
        """Part of a frame has arrived and the rest has not."""
        return self._cur is not None or self._buf[:1] == MAGIC[:1]

    def feed(self, data: bytes) -> List[Item]:
        out: List[Item] = []
        view = memoryview(data)
        if self._cur is not None:
            rest = self._into_blob(view)
            self._pos += len(view) - len(rest)
            view = rest
            if self._cur.left:
                return out  # all of it belonged to the blob
            self._emit(out, self._finish())
        self._buf += view
        while True:
            item = self._next()
            if item is None:
                return out
            self._emit(out, item)

    def _emit(self, out: List[Item], item: Union[Item, _Bad]) -> None:
        if isinstance(item, _Bad):
            self.errors += 1
            if out and isinstance(out[-1], ProtocolError):
                return
            item = ProtocolError(item.what, source=self.source, offset=item.offset)
        out.append(item)

    def _drop(self, n: int) -> None:
        del self._buf[:n]
        self._pos += n

    def _err(self, what: str, offset: int) -> _Bad:
        return _Bad(what, offset)

    def _next(self) -> Union[Item, _Bad, None]:
        buf = self._buf
        # separators between orders and frames
        i = 0
        while i < len(buf) and buf[i] in b" \t\r\n\x00":
            i += 1
        if i:
            self._drop(i)
        if not buf:
            return None
        start = self._pos
        if buf[0:1] == MAGIC[0:1]:
            if len(buf) < len(MAGIC):
                if bytes(buf) == MAGIC[: len(buf)]:
                    return None  # could still become a frame
            elif buf.startswith(MAGIC):
                return self._frame(start)
        if self.allow_orders:
            return self._line(start)
        # garbage where a frame should be: skip to the next magic, searched in place
        # (a copy of the buffer per search made near-magic garbage quadratic)
        nxt = buf.find(MAGIC, 1)
        skipped = nxt if nxt > 0 else max(1, len(buf) - len(MAGIC) + 1)
        self._drop(skipped)
        return self._err("%d bytes of garbage instead of a frame" % skipped, start)

    def _frame(self, start: int) -> Union[Item, _Bad, None]:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        _, version, mtype, _flags, jlen, blen = HEADER.unpack_from(buf)
        if version != VERSION or jlen > MAX_JSON or blen > MAX_BLOB:
            # Cannot trust the lengths: drop the magic and resynchronise.
            self._drop(len(MAGIC))
            if version != VERSION:
                return self._err("unsupported protocol version %d (this side speaks %d)" % (version, VERSION), start)
            return self._err("frame too large (json %d, blob %d bytes)" % (jlen, blen), start)
        fields: Union[Dict[str, Any], _Bad]
        if jlen > self.max_json:
            # A frame this side never takes: skipped whole, as it streams past, unparsed.
            self._drop(HEADER_SIZE)
            fields = self._err("message JSON of %d bytes is over this side's %d-byte limit" % (jlen, self.max_json),
                               start)
            self._cur = _Frame(mtype, fields, jlen + blen, False, HEADER_SIZE + jlen + blen)
        else:
            if len(buf) < HEADER_SIZE + jlen:
                return None
            body = bytes(buf[HEADER_SIZE: HEADER_SIZE + jlen])
            self._drop(HEADER_SIZE + jlen)
            try:
                fields = _parse_fields(body, start + HEADER_SIZE)
            except ProtocolError as exc:
                fields = self._err(exc.what, start)
            if mtype not in NAMES and not isinstance(fields, _Bad):
                fields = self._err("unknown message type %d" % mtype, start)
            keep = False
            if blen and isinstance(fields, dict) and blen <= self.max_blob:
                keep = self.keep_blob is None or bool(self.keep_blob(mtype, fields, blen))
            self._cur = _Frame(mtype, fields, blen, keep, HEADER_SIZE + jlen + blen)
        # what is already buffered after the JSON is the blob's beginning
        with memoryview(buf) as mv:
            taken = len(mv) - len(self._into_blob(mv))
        self._drop(taken)
        if self._cur.left:
            return None  # the buffer is empty now; feed() routes the rest of the blob
        return self._finish()

    def _into_blob(self, view: memoryview) -> memoryview:
        """Keep (or skip) the part of ``view`` that belongs to the current blob; return
        the rest."""
        cur = self._cur
        assert cur is not None
        n = min(cur.left, len(view))
        if n and cur.blob is not None:
            cur.blob += view[:n]
        cur.left -= n
        return view[n:]

    def _finish(self) -> Union[Item, _Bad]:
        cur = self._cur
        assert cur is not None and cur.left == 0
        self._cur = None
        if isinstance(cur.fields, _Bad):
            self.bad_frames[cur.type] = self.bad_frames.get(cur.type, 0) + 1
            return cur.fields
        kept = cur.blob if cur.blob is not None else b""
        return Message(cur.type, cur.fields, kept, size=cur.size, blob_dropped=cur.blen - len(kept))

    def _line(self, start: int) -> Union[Item, _Bad, None]:
        buf = self._buf
        end = buf.find(b"\n")
        magic = buf.find(MAGIC, 1)
        if magic > 0 and (end < 0 or magic < end):
            # garbage glued to a following frame: report it, keep the frame
            shown = bytes(buf[:min(magic, 40)]).decode("ascii", "replace")
            self._drop(magic)
            return self._err("unknown plain order %r (expected 1 or 0)" % shown, start)
        if end < 0:
            if len(buf) > MAX_LINE:
                self._drop(len(buf))
                return self._err("line longer than %d bytes" % MAX_LINE, start)
            # The seed host writes "1\n"; a lone "1" or "0" is complete too.
            if bytes(buf) in (b"1", b"0"):
                start_order = buf[0:1] == b"1"
                self._drop(1)
                return Order(start_order)
            return None
        line = bytes(buf[:end]).strip()
        self._drop(end + 1)
        if line == b"1":
            return Order(True)
        if line == b"0":
            return Order(False)
        shown = line[:40].decode("ascii", "replace")
        return self._err("unknown plain order %r (expected 1 or 0)" % shown, start)


def iter_frames(data: bytes, source: str = "stream") -> Iterator[Message]:
    """Decode a complete buffer of frames, raising on the first malformed one."""
    dec = Decoder(allow_orders=False, source=source)
    for item in dec.feed(data):
        if isinstance(item, ProtocolError):
            raise item
        yield item  # type: ignore[misc]
    if dec.pending:
        raise ProtocolError("truncated frame (%d bytes left)" % dec.pending, source=source)


# -- metadata: relative name -> bytes, in one message ---------------------------------

def pack_files(files: Mapping[str, bytes], **fields: Any) -> Message:
    """A METADATA message carrying ``files`` (names as in the raw directory layout)."""
    index = []
    parts = []
    for name in sorted(files):
        if not metadata_name_ok(name):
            raise ProtocolError("metadata name %r not allowed" % name)
        data = bytes(files[name])
        index.append([name, len(data)])
        parts.append(data)
    return Message(METADATA, dict(fields, files=index), b"".join(parts))


def _short(value: Any, limit: int = 60) -> str:
    """A peer's value for an error message: one line, never longer than ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def unpack_files(msg: Message) -> Dict[str, bytes]:
    """The files of a METADATA message, names validated, sizes checked against the blob."""
    index = msg.get("files")
    if not isinstance(index, list):
        raise ProtocolError("metadata message without a files list")
    if msg.blob_dropped:
        raise ProtocolError("metadata blob of %d bytes was not kept: the request asked for no blob or a "
                            "smaller one (blob_cap)" % msg.blob_dropped)
    out: Dict[str, bytes] = {}
    pos = 0
    for entry in index:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], int)
            or isinstance(entry[1], bool)
            or entry[1] < 0
        ):
            raise ProtocolError("metadata entry %s is not [name, size]" % _short(entry))
        name, size = entry
        if len(name) > MAX_NAME or not metadata_name_ok(name):
            raise ProtocolError("metadata name %r not allowed" % name[:80])
        if pos + size > len(msg.blob):
            raise ProtocolError("metadata %s overruns the blob (%d + %d > %d)" % (name, pos, size, len(msg.blob)))
        with memoryview(msg.blob) as mv:
            out[name] = bytes(mv[pos: pos + size])
        pos += size
    if pos != len(msg.blob):
        raise ProtocolError("metadata blob has %d bytes not named by any file" % (len(msg.blob) - pos))
    return out


# -- field checks shared by both sides -------------------------------------------------

def require(msg: Message, key: str, kind: Union[type, Tuple[type, ...]], optional: bool = False) -> Any:
    """Return ``msg.fields[key]`` if it has the expected JSON type, else raise."""
    if key not in msg.fields:
        if optional:
            return None
        raise ProtocolError("%s message lacks %r" % (msg.name, key))
    value = msg.fields[key]
    # bool is an int in Python; a JSON true must not pass as a number
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise ProtocolError("%s message field %r has the wrong type" % (msg.name, key))
    if not isinstance(value, kind):
        raise ProtocolError("%s message field %r has the wrong type" % (msg.name, key))
    return value
