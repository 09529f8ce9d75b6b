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
import re
import struct
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from vmtrace.errors import FormatError

MAGIC = b"VMTR"
VERSION = 1
# magic, version, type, flags (reserved, 0), JSON length, blob length; little endian.
HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = HEADER.size  # 16

MAX_JSON = 1 << 20  # a control message's JSON part
MAX_BLOB = 64 << 20  # metadata (kallsyms.gz is a few MB) and -o page chunks (<= 1 MiB)
MAX_LINE = 256  # a plain order line; longer lines are garbage

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
# before a host writes it to disk.
METADATA_NAME = re.compile(
    r"^(header_page|header_event|saved_cmdlines|printk_formats|kallsyms(\.gz)?|meta\.json"
    r"|events/[A-Za-z0-9_]+/[A-Za-z0-9_.-]+/format)$"
)


class ProtocolError(FormatError):
    """A frame or order that does not parse; the stream offset says where."""


class Message:
    """One framed message: a type, a JSON object of fields and an optional binary blob."""

    __slots__ = ("type", "fields", "blob")

    def __init__(self, type: int, fields: Optional[Mapping[str, Any]] = None, blob: bytes = b""):
        if type not in NAMES:
            raise ProtocolError("unknown message type %d" % type)
        self.type = type
        self.fields = dict(fields or {})
        self.blob = blob

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


def _parse_fields(data: bytes, offset: int) -> Dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("message JSON does not parse", offset=offset) from None
    if not isinstance(obj, dict):
        raise ProtocolError("message JSON is not an object", offset=offset)
    return obj


class Decoder:
    """Incremental decoder for a byte stream of frames (and, if allowed, plain orders).

    ``feed(data)`` returns the complete items found so far: :class:`Message`,
    :class:`Order`, or a :class:`ProtocolError` for something malformed, after which the
    decoder has already resynchronised (it skips to the next frame magic or line end),
    so one bad write never poisons the rest of the session. Memory is bounded by
    MAX_JSON + MAX_BLOB + HEADER_SIZE.

    The agent uses ``allow_orders=True`` (the control port carries both forms); the host
    uses ``allow_orders=False`` (the agent only ever sends frames).
    """

    def __init__(self, allow_orders: bool = True, source: str = "control stream"):
        self.allow_orders = allow_orders
        self.source = source
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame or line."""
        return len(self._buf)

    def feed(self, data: bytes) -> List[Item]:
        self._buf += data
        out: List[Item] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def _drop(self, n: int) -> None:
        del self._buf[:n]
        self._pos += n

    def _err(self, what: str, offset: int) -> ProtocolError:
        return ProtocolError(what, source=self.source, offset=offset)

    def _next(self) -> Optional[Item]:
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
            elif bytes(buf[:4]) == MAGIC:
                return self._frame(start)
        if self.allow_orders:
            return self._line(start)
        # garbage where a frame should be: skip to the next magic
        nxt = bytes(buf).find(MAGIC, 1)
        skipped = nxt if nxt > 0 else max(1, len(buf) - len(MAGIC) + 1)
        self._drop(skipped)
        return self._err("%d bytes of garbage instead of a frame" % skipped, start)

    def _frame(self, start: int) -> Optional[Item]:
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
        total = HEADER_SIZE + jlen + blen
        if len(buf) < total:
            return None
        body = bytes(buf[HEADER_SIZE: HEADER_SIZE + jlen])
        blob = bytes(buf[HEADER_SIZE + jlen: total])
        self._drop(total)
        try:
            fields = _parse_fields(body, start + HEADER_SIZE)
        except ProtocolError as exc:
            return self._err(exc.what, start)
        if mtype not in NAMES:
            return self._err("unknown message type %d" % mtype, start)
        return Message(mtype, fields, blob)

    def _line(self, start: int) -> Optional[Item]:
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
        if not METADATA_NAME.match(name):
            raise ProtocolError("metadata name %r not allowed" % name)
        data = bytes(files[name])
        index.append([name, len(data)])
        parts.append(data)
    return Message(METADATA, dict(fields, files=index), b"".join(parts))


def unpack_files(msg: Message) -> Dict[str, bytes]:
    """The files of a METADATA message, names validated, sizes checked against the blob."""
    index = msg.get("files")
    if not isinstance(index, list):
        raise ProtocolError("metadata message without a files list")
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
            raise ProtocolError("metadata entry %r is not [name, size]" % (entry,))
        name, size = entry
        if not METADATA_NAME.match(name):
            raise ProtocolError("metadata name %r not allowed" % name[:80])
        if pos + size > len(msg.blob):
            raise ProtocolError("metadata %s overruns the blob (%d + %d > %d)" % (name, pos, size, len(msg.blob)))
        out[name] = bytes(msg.blob[pos: pos + size])
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
