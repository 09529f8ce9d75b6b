"""Event formats (``events/SYSTEM/EVENT/format``) and decoding one payload.

The format file is the kernel's own description of a payload: every field's C type,
offset, size and signedness. We turn each field into a small decoding plan once, so
that decoding an event is one ``struct.unpack_from`` for all fixed scalars plus a few
slices for strings and arrays. Decoding *many* events of one type at once (numpy
columns) is :mod:`vmtrace.format.columns`, a base class of :class:`EventFormat`.

Format texts come from guests and are untrusted: offsets and sizes are bounded, and a
field that cannot be understood is reported with the format's name and line.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from vmtrace.errors import FormatError
from vmtrace.format.columns import ColumnarDecoding, _text
from vmtrace.format.fieldline import parse_field_line

# A payload lives in one ring-buffer page; sub-buffers are at most a few MB.
MAX_PAYLOAD = 1 << 24
MAX_FIELDS = 1024

# Field kinds: how a field's bytes become a Python value.
SCALAR = "scalar"        # int (pointers too)
STRING = "string"        # char x[N]: text up to the first NUL
ARRAY = "array"          # other fixed arrays: list of ints
DYN_STRING = "dynstr"    # __data_loc / __rel_loc char[]
DYN_ARRAY = "dynarray"   # __data_loc / __rel_loc of anything else
FLEX_STRING = "flexstr"  # char x[] (size 0): text to the end of the payload
FLEX_ARRAY = "flexarray"  # T x[] (size 0): elements to the end of the payload

_ARRAY_RE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*\[(?P<len>[^\]]*)\]$")

_ONE = {"char", "u8", "s8", "__u8", "__s8", "bool", "_Bool", "int8_t", "uint8_t",
        "unsigned char", "signed char"}
_TWO = {"short", "u16", "s16", "__u16", "__s16", "int16_t", "uint16_t", "unsigned short",
        "short int", "unsigned short int", "umode_t"}
_FOUR = {"int", "unsigned", "unsigned int", "u32", "s32", "__u32", "__s32", "int32_t",
         "uint32_t", "pid_t", "uid_t", "gid_t", "gfp_t", "dev_t", "uint"}
_EIGHT = {"long long", "unsigned long long", "u64", "s64", "__u64", "__s64", "int64_t",
          "uint64_t", "long long int", "unsigned long long int"}
_LONG = {"long", "unsigned long", "size_t", "ssize_t", "long int", "unsigned long int",
         "cpumask_t"}


def _base_type(ctype: str) -> str:
    words = [w for w in ctype.replace("*", " * ").split()
             if w not in ("const", "volatile", "__seg_gs", "__user", "__rcu")]
    return " ".join(words)


def _type_size(ctype: str, long_size: int) -> Optional[int]:
    """Size of a C element type as the kernel's format files spell them, if known."""
    base = _base_type(ctype)
    if "*" in base:
        return long_size
    if base in _ONE:
        return 1
    if base in _TWO:
        return 2
    if base in _FOUR:
        return 4
    if base in _EIGHT:
        return 8
    if base in _LONG:
        return long_size
    return None


@dataclass
class Field:
    """One payload field and the plan for decoding it."""

    name: str
    type: str                 # C type without the name, e.g. "char[16]", "__data_loc char[]"
    offset: int
    size: int
    signed: bool
    kind: str = SCALAR
    elem_size: int = 0        # arrays: size of one element
    count: int = 0            # fixed arrays: number of elements
    is_pointer: bool = False
    is_long: bool = False     # C long (printed in hex by trace-cmd -R, symbolised sometimes)
    rel: bool = False         # __rel_loc: offset counts from the end of this field

    @property
    def is_common(self) -> bool:
        return self.name.startswith("common_")

    @property
    def is_string(self) -> bool:
        return self.kind in (STRING, DYN_STRING, FLEX_STRING)

    @property
    def is_dynamic(self) -> bool:
        return self.kind in (DYN_STRING, DYN_ARRAY)

    def numpy_dtype(self, endian: str) -> Optional[np.dtype]:
        """The dtype of this field inside a structured row, or None if variable."""
        if self.kind == SCALAR and self.size in (1, 2, 4, 8):
            return np.dtype(f"{endian}{'i' if self.signed else 'u'}{self.size}")
        if self.kind == STRING:
            return np.dtype(f"S{self.size}")
        if self.kind == ARRAY and self.elem_size in (1, 2, 4, 8):
            return np.dtype((np.dtype(f"{endian}{'i' if self.signed else 'u'}{self.elem_size}"),
                             (self.count,)))
        return None


_IDENT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _split_decl(decl: str) -> Optional[Tuple[str, str]]:
    """(type, name) of a declaration: the name is the longest identifier at the end,
    with one ``[...]`` after it if there is one (``char comm[16]``).

    Scanned in one pass; the regex it replaces backtracked quadratically over a long
    declaration (10,000 characters: 5.8 s) and is still the definition of the result.
    """
    if not decl.endswith("]"):
        return _ident_before(decl, len(decl), "")
    # the bracket is the earliest "[" with no "]" after it but the last, whose text
    # before it ends in an identifier
    lb = decl.find("[", decl.rfind("]", 0, len(decl) - 1) + 1)
    while 0 <= lb < len(decl) - 1:
        end = lb
        while end > 0 and decl[end - 1].isspace():
            end -= 1
        if end and decl[end - 1] in _IDENT:
            hit = _ident_before(decl, end, "")
            if hit is not None:
                return hit[0], hit[1] + decl[lb:].replace(" ", "")
        lb = decl.find("[", lb + 1)
    return None


def _ident_before(decl: str, end: int, suffix: str) -> Optional[Tuple[str, str]]:
    start = end
    while start > 0 and decl[start - 1] in _IDENT:
        start -= 1
    while start < end and decl[start].isdigit():
        start += 1
    if start == end:
        return None
    return decl[:start].strip(), decl[start:end] + suffix


def _parse_field(decl: str, offset: int, size: int, signed: bool, long_size: int,
                 where: str) -> Field:
    decl = " ".join(decl.split())
    dyn = rel = False
    if decl.startswith("__data_loc "):
        dyn, decl = True, decl[len("__data_loc "):]
    elif decl.startswith("__rel_loc "):
        dyn = rel = True
        decl = decl[len("__rel_loc "):]
    if not decl:
        raise FormatError("empty field declaration", source=where)
    # The name is the last identifier; "[]" may stick to the type ("char[] name").
    split = _split_decl(decl)
    if split is None:
        raise FormatError(f"cannot parse field declaration {decl[:80]!r}", source=where)
    ctype, name = split
    arr = _ARRAY_RE.match(name)
    alen: Optional[str] = None
    if arr:
        name, alen = arr.group("name"), arr.group("len").strip()
    if ctype.endswith("[]"):
        ctype = ctype[:-2].strip()
        alen = alen if alen is not None else ""
    if not ctype:
        raise FormatError(f"field {name!r} has no type", source=where)
    base = _base_type(ctype)
    is_char = base in ("char", "signed char")
    is_pointer = "*" in base
    is_long = base in ("long", "unsigned long") or (base in _LONG and base != "cpumask_t")
    esize = _type_size(ctype, long_size)
    shown = f"{'__rel_loc ' if rel else '__data_loc ' if dyn else ''}{ctype}" + \
        ("" if alen is None else f"[{alen}]")
    f = Field(name=name, type=shown, offset=offset, size=size, signed=signed,
              is_pointer=is_pointer and alen is None, is_long=is_long and alen is None, rel=rel)
    if dyn:
        if size != 4:
            raise FormatError(f"field {name!r}: dynamic location of size {size}, expected 4",
                              source=where)
        f.kind = DYN_STRING if is_char else DYN_ARRAY
        f.elem_size = 1 if is_char else (esize or 1)
        return f
    if alen is not None:
        if size == 0 or alen == "":
            f.kind = FLEX_STRING if is_char else FLEX_ARRAY
            f.elem_size = 1 if is_char else (esize or 1)
            return f
        if is_char:
            f.kind, f.elem_size, f.count = STRING, 1, size
            return f
        n = int(alen) if alen.isdigit() else 0
        if n > 0 and size % n == 0:
            f.elem_size, f.count = size // n, n
        elif esize and size % esize == 0:
            f.elem_size, f.count = esize, size // esize
        else:
            f.elem_size, f.count = 1, size
        f.kind = ARRAY
        return f
    f.kind = SCALAR
    return f


@dataclass
class EventFormat(ColumnarDecoding):
    """One event type: its id, names, fields and raw ``print fmt`` text."""

    id: int
    system: str
    name: str
    fields: List[Field]
    print_fmt: str = ""
    endian: str = "<"
    long_size: int = 8
    _plan: Any = field(default=None, repr=False, compare=False)

    @property
    def full_name(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def common_fields(self) -> List[Field]:
        return [f for f in self.fields if f.is_common]

    @property
    def event_fields(self) -> List[Field]:
        return [f for f in self.fields if not f.is_common]

    def field(self, name: str) -> Optional[Field]:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    @property
    def fixed_size(self) -> int:
        """Bytes a payload must have to hold every fixed-position field."""
        return max((f.offset + (4 if f.is_dynamic else f.size) for f in self.fields), default=0)

    # -- one payload ----------------------------------------------------------------
    def _compile(self) -> Any:
        scal = [f for f in self.event_fields if f.kind == SCALAR and f.size in (1, 2, 4, 8)]
        scal.sort(key=lambda f: f.offset)
        fmt, pos, names = [self.endian], 0, []
        codes = {1: "b", 2: "h", 4: "i", 8: "q"}
        for f in scal:
            if f.offset < pos:   # overlapping fields (unions): decode separately
                continue
            if f.offset > pos:
                fmt.append(f"{f.offset - pos}x")
            c = codes[f.size]
            fmt.append(c if f.signed else c.upper())
            names.append(f.name)
            pos = f.offset + f.size
        st = struct.Struct("".join(fmt))
        rest = [f for f in self.event_fields if f.name not in set(names)]
        self._plan = (st, names, rest, self.fixed_size)
        return self._plan

    def decode(self, payload: Union[bytes, memoryview], *, common: bool = False) -> Dict[str, Any]:
        """Field values of one payload: ints, str for char data, lists for arrays.

        Common fields (pid, flags, preempt count) are left out unless ``common`` is set,
        because :class:`vmtrace.api.Event` carries them as attributes.
        """
        st, names, rest, fixed = self._plan or self._compile()
        n = len(payload)
        if n < st.size:
            raise FormatError(f"{self.full_name}: payload of {n} bytes is shorter than its "
                              f"fields ({st.size} bytes)")
        out: Dict[str, Any] = {}
        if common:
            for f in self.common_fields:
                out[f.name] = self._value(f, payload)
        out.update(zip(names, st.unpack_from(payload)))
        for f in rest:
            out[f.name] = self._value(f, payload)
        return out

    def _value(self, f: Field, payload: Union[bytes, memoryview]) -> Any:
        n = len(payload)
        kind = f.kind
        if kind in (DYN_STRING, DYN_ARRAY):
            if f.offset + 4 > n:
                raise self._short(f, n)
            loc = int.from_bytes(payload[f.offset:f.offset + 4], _bo(self.endian))
            start, length = loc & 0xFFFF, loc >> 16
            if f.rel:
                start += f.offset + 4
            if start + length > n:
                raise FormatError(f"{self.full_name}: field {f.name!r} points at bytes "
                                  f"{start}..{start + length} past the payload end {n}")
            raw = bytes(payload[start:start + length])
            return _text(raw) if kind == DYN_STRING else self._ints(f, raw)
        if kind in (FLEX_STRING, FLEX_ARRAY):
            raw = bytes(payload[min(f.offset, n):])
            return _text(raw) if kind == FLEX_STRING else self._ints(f, raw)
        end = f.offset + f.size
        if end > n:
            raise self._short(f, n)
        raw = bytes(payload[f.offset:end])
        if kind == STRING:
            return _text(raw)
        if kind == ARRAY:
            return self._ints(f, raw)
        return int.from_bytes(raw, _bo(self.endian), signed=f.signed)

    def _ints(self, f: Field, raw: bytes) -> List[int]:
        es = f.elem_size or 1
        usable = len(raw) - len(raw) % es
        if es in (1, 2, 4, 8):
            dt = np.dtype(f"{self.endian}{'i' if f.signed else 'u'}{es}")
            return np.frombuffer(raw, dt, count=usable // es).tolist()
        return [int.from_bytes(raw[i:i + es], _bo(self.endian), signed=f.signed)
                for i in range(0, usable, es)]


    def _short(self, f: Field, n: int) -> FormatError:
        return FormatError(f"{self.full_name}: payload of {n} bytes ends inside field "
                           f"{f.name!r} (offset {f.offset}, size {f.size})")


def _bo(endian: str) -> str:
    return "little" if endian in ("<", "little", "=") else "big"



def parse_format(text: Union[str, bytes], *, system: Optional[str] = None, long_size: int = 8,
                 endian: str = "<", source: Optional[str] = None,
                 max_payload: int = MAX_PAYLOAD) -> EventFormat:
    """Parse one ``format`` file. ``system`` is not in the text; the caller knows it.

    Every field must lie within ``max_payload`` bytes (a trace's page data size: no
    payload is longer), because decoding allocates rows as wide as the farthest field.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    endian = {"little": "<", "big": ">"}.get(endian, endian)
    if endian not in ("<", ">"):
        raise FormatError(f"bad endianness {endian!r}", source=source)
    if long_size not in (4, 8):
        raise FormatError(f"bad long size {long_size}", source=source)
    name: Optional[str] = None
    ev_id: Optional[int] = None
    fields: List[Field] = []
    print_fmt = ""
    where = source or "format"
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        loc = f"{where}:{lineno}"
        if s.startswith("name:"):
            name = s[5:].strip()
        elif s.startswith("ID:"):
            v = s[3:].strip()
            if not v.isdigit() or len(v) > 5 or int(v) > 0xFFFF:
                raise FormatError(f"bad event ID {v!r}", source=loc)
            ev_id = int(v)
        elif s.startswith("field:") or s.startswith("field "):
            fl = parse_field_line(s)
            if fl is None:
                raise FormatError(f"cannot parse field line {s[:80]!r}", source=loc)
            off, size = fl.offset, fl.size
            if not (0 <= off and 0 <= size and off + size <= max_payload):
                raise FormatError(f"event {name!r}: field {fl.decl.split()[-1][:40] if fl.decl.split() else ''!r}"
                                  f" at offset {off}, size {size} out of range: a payload has at "
                                  f"most {max_payload} bytes", source=loc)
            signed = fl.signed not in (None, 0)
            if len(fields) >= MAX_FIELDS:
                raise FormatError(f"more than {MAX_FIELDS} fields", source=loc)
            fields.append(_parse_field(fl.decl, off, size, signed, long_size, loc))
        elif s.startswith("print fmt:"):
            print_fmt = line.split("print fmt:", 1)[1].strip()
    if name is None or not re.match(r"^[A-Za-z0-9_.\-]+$", name):
        raise FormatError(f"missing or bad event name {name!r}", source=where)
    if ev_id is None:
        raise FormatError(f"event {name!r} has no ID", source=where)
    return EventFormat(id=ev_id, system=system or "", name=name, fields=fields,
                       print_fmt=print_fmt, endian=endian, long_size=long_size)


_ID_RE = re.compile(rb"^ID:\s*(\d+)", re.M)
_NAME_RE = re.compile(rb"^name:\s*(\S+)", re.M)


class EventCatalog:
    """Every event format of one trace, looked up by ID or by "system:name".

    A trace.dat carries ~2000 formats but a trace uses a few dozen, so formats are
    indexed by a cheap scan of their ``ID:`` line and parsed on first use.
    """

    def __init__(self, *, long_size: int = 8, endian: str = "<", max_payload: int = MAX_PAYLOAD):
        self.long_size = long_size
        self.endian = endian
        self.max_payload = max_payload
        self._raw: Dict[int, Tuple[str, bytes]] = {}
        self._by_name: Dict[str, int] = {}
        self._parsed: Dict[int, EventFormat] = {}

    def add(self, system: str, text: Union[str, bytes]) -> None:
        raw = text.encode() if isinstance(text, str) else bytes(text)
        m = _ID_RE.search(raw)
        n = _NAME_RE.search(raw)
        if not m or not n or len(m.group(1)) > 5 or int(m.group(1)) > 0xFFFF:
            return  # not an event format (or one without an ID): nothing can refer to it
        ev_id = int(m.group(1))
        self._raw[ev_id] = (system, raw)
        self._by_name[f"{system}:{n.group(1).decode('utf-8', 'replace')}"] = ev_id
        self._parsed.pop(ev_id, None)

    @classmethod
    def from_texts(cls, ftrace_formats: Iterable[bytes], event_formats: Iterable[Tuple[str, bytes]],
                   *, long_size: int = 8, endian: str = "<",
                   max_payload: int = MAX_PAYLOAD) -> "EventCatalog":
        cat = cls(long_size=long_size, endian=endian, max_payload=max_payload)
        for text in ftrace_formats:
            cat.add("ftrace", text)
        for system, text in event_formats:
            cat.add(system, text)
        return cat

    def __contains__(self, ev_id: int) -> bool:
        return ev_id in self._raw

    def __len__(self) -> int:
        return len(self._raw)

    def ids(self) -> List[int]:
        return sorted(self._raw)

    def names(self) -> List[str]:
        return sorted(self._by_name)

    def get(self, ev_id: int) -> Optional[EventFormat]:
        """The format for ``ev_id``, or None if the trace did not describe it."""
        fmt = self._parsed.get(ev_id)
        if fmt is None:
            if ev_id not in self._raw:
                return None
            system, raw = self._raw[ev_id]
            fmt = parse_format(raw, system=system, long_size=self.long_size, endian=self.endian,
                               source=f"events/{system}/format(ID {ev_id})",
                               max_payload=self.max_payload)
            self._parsed[ev_id] = fmt
        return fmt

    def by_name(self, spec: str) -> Optional[EventFormat]:
        """Look up "system:name" (or a bare name when it is unique)."""
        spec = spec.replace("/", ":")
        if ":" in spec:
            ev_id = self._by_name.get(spec)
            return self.get(ev_id) if ev_id is not None else None
        hits = [i for k, i in self._by_name.items() if k.split(":", 1)[1] == spec]
        return self.get(hits[0]) if len(hits) == 1 else None

    def match(self, specs: Sequence[str]) -> List[int]:
        """IDs matching "system", "system:name", "name" or shell globs in either part."""
        import fnmatch
        out = set()
        for spec in specs:
            spec = spec.replace("/", ":")
            sys_pat, colon, ev_pat = spec.partition(":")
            for full, ev_id in self._by_name.items():
                system, name = full.split(":", 1)
                if colon:
                    ok = fnmatch.fnmatchcase(system, sys_pat) and fnmatch.fnmatchcase(name, ev_pat or "*")
                else:
                    ok = fnmatch.fnmatchcase(name, spec) or fnmatch.fnmatchcase(system, spec)
                if ok:
                    out.add(ev_id)
        return sorted(out)

    def __iter__(self) -> Iterator[EventFormat]:
        for ev_id in self.ids():
            fmt = self.get(ev_id)
            if fmt is not None:
                yield fmt
