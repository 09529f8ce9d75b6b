"""What the compiler knows of a field, and the Python that reads fields from a payload.

A print fmt refers to fields by name; :func:`field_info` turns the several shapes a
field arrives in (an :class:`vmtrace.format.events.Field`, a dict, an object) into one
:class:`FieldInfo`, so the parser and code generator never look at event formats.
:func:`payload_reader` writes the lines that unpack the used fields with one
precompiled ``struct`` call, which is what keeps per-event rendering cheap.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from vmtrace.format.printfmt.cexpr import _type_of
from vmtrace.format.printfmt.runtime import _HELPERS


@dataclass(frozen=True)
class FieldInfo:
    """What the compiler needs to know about a field: where it is and how it decodes."""
    name: str
    offset: int = 0
    size: int = 8            # bytes the field occupies in the payload (data_loc: 4)
    signed: bool = False
    is_array: bool = False
    is_string: bool = False  # char arrays and __data_loc char[]: decoded as str
    is_dynamic: bool = False
    is_rel: bool = False     # __rel_loc: offset counted from the end of the field
    elsize: int = 1          # bytes per element (scalars: == size)


# events.Field.kind -> (is_array, is_string, is_dynamic)
_KINDS = {"scalar": (False, False, False), "string": (True, True, False),
          "array": (True, False, False), "dynstr": (True, True, True),
          "dynarray": (True, False, True), "flexstr": (True, True, False),
          "flexarray": (True, False, False)}


def field_info(f: Any, long_size: int = 8) -> FieldInfo:
    """Adapt an EventFormat field (or a similar object / dict) into a FieldInfo."""
    if isinstance(f, FieldInfo):
        return f
    get = (lambda k, d=None: f.get(k, d)) if isinstance(f, Mapping) else (lambda k, d=None: getattr(f, k, d))
    name = str(get("name"))
    ctype = str(get("type", "") or get("ctype", "") or "")
    size = int(get("size", 0) or 0)
    offset = int(get("offset", 0) or 0)
    signed = bool(get("signed", False))
    kind = get("kind")
    if isinstance(kind, str) and kind in _KINDS:   # a vmtrace.format.events.Field
        arr, is_string, dyn = _KINDS[kind]
        if "[" in name:
            name = name.split("[", 1)[0]
        return FieldInfo(name=name, offset=offset, size=size, signed=signed, is_array=arr,
                         is_string=is_string, is_dynamic=dyn, is_rel=bool(get("rel", False)),
                         elsize=max(1, int(get("elem_size", 0) or (size if not arr else 1))))
    rel = ctype.startswith("__rel_loc") or bool(get("is_rel", False))
    dyn = bool(get("is_dynamic", False) or get("data_loc", False)) or rel or ctype.startswith("__data_loc")
    arr = bool(get("is_array", False) or get("array", False) or dyn or "[" in ctype or "[" in name)
    if "[" in name:
        name = name.split("[", 1)[0]
    base = re.sub(r"\[.*", "", ctype.replace("__data_loc", "").replace("__rel_loc", "")).strip()
    is_string = arr and re.search(r"\bchar\b", base) is not None and "*" not in base
    elsize = size
    if arr:
        elsize = int(get("elsize", 0) or get("element_size", 0) or 0)
        if not elsize:
            t = _type_of(base.split(), "*" in base)
            elsize = (t[0] // 8) if t else 1
            if re.search(r"\blong\b", base) and base.count("long") == 1 and long_size == 4:
                elsize = 4
    return FieldInfo(name=name, offset=offset, size=size, signed=signed, is_array=arr,
                     is_string=is_string, is_dynamic=dyn, is_rel=rel, elsize=max(1, elsize))


_STRUCT_CODE = {1: "b", 2: "h", 4: "i", 8: "q"}


def payload_reader(infos: Sequence[FieldInfo], names: Iterable[str],
                   endian: str = "<") -> tuple[list[str], dict]:
    """Python source lines that set f_<name> from payload ``p``, and the globals they need.

    Scalars are read with one precompiled struct covering all of them (one C call per
    event); strings and arrays with the small helpers above.
    """
    by_name = {fi.name: fi for fi in infos}
    wanted = [by_name[n] for n in sorted(set(names)) if n in by_name]
    consts: dict = {}
    lines: list[str] = []
    scalars = sorted((fi for fi in wanted if not fi.is_array and fi.size in _STRUCT_CODE),
                     key=lambda fi: fi.offset)
    group: list[FieldInfo] = []
    fmt = endian
    pos = 0
    for fi in scalars:
        if fi.offset < pos:          # overlapping field: read it on its own
            k = "_st%d" % len(consts)
            c = _STRUCT_CODE[fi.size]
            consts[k] = struct.Struct(endian + (c if fi.signed else c.upper()))
            lines.append("    f_%s, = %s.unpack_from(p, %d)" % (fi.name, k, fi.offset))
            continue
        fmt += "x" * (fi.offset - pos)
        c = _STRUCT_CODE[fi.size]
        fmt += c if fi.signed else c.upper()
        pos = fi.offset + fi.size
        group.append(fi)
    if group:
        k = "_st%d" % len(consts)
        consts[k] = struct.Struct(fmt)
        names_ = ", ".join("f_" + fi.name for fi in group)
        lines.insert(0, "    %s, = %s.unpack_from(p, 0)" % (names_, k))
    for fi in wanted:
        if not fi.is_array and fi.size in _STRUCT_CODE:
            continue
        if not fi.is_array:      # odd-sized scalar
            lines.append("    f_%s = int.from_bytes(p[%d:%d], %r, signed=%r)"
                         % (fi.name, fi.offset, fi.offset + fi.size,
                            "little" if endian == "<" else "big", fi.signed))
        elif fi.is_dynamic and fi.is_string:
            lines.append("    f_%s = _dstr(p, %d, %r)" % (fi.name, fi.offset, fi.is_rel))
        elif fi.is_dynamic:
            lines.append("    f_%s = _darr(p, %d, %r, %d, %r)"
                         % (fi.name, fi.offset, fi.is_rel, fi.elsize, fi.signed))
        elif fi.is_string:
            lines.append("    f_%s = _cstr(p, %d, %d)" % (fi.name, fi.offset, fi.size))
        else:
            lines.append("    f_%s = _sarr(p, %d, %d, %d, %r)"
                         % (fi.name, fi.offset, fi.size, fi.elsize, fi.signed))
    return lines, consts


def compile_reader(fields: Iterable[Any], names: Sequence[str], *, long_size: int = 8,
                   endian: str = "<") -> Callable[[Any], tuple]:
    """A function payload -> tuple of the named fields' values (for plugins)."""
    infos = [field_info(f, long_size) for f in fields]
    known = {fi.name for fi in infos}
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(missing[0])
    lines, consts = payload_reader(infos, names, endian)
    src = "def _read(p):\n" + "\n".join(lines) + "\n    return (%s,)\n" % ", ".join("f_" + n for n in names)
    glb = dict(_HELPERS, **consts)
    ns: dict = {}
    exec(compile(src, "<field reader>", "exec"), glb, ns)  # noqa: S102 - generated from field layouts
    return ns["_read"]
