"""How one event type's lines are made in bulk: a %-format and one column per argument.

Each conversion's argument expression (from the compiled print fmt, or a plugin's bulk
form) becomes a column of values: a field as is, simple casts and masks in numpy, helper
calls once per distinct value, anything else per event with the same generated
expression the per-event renderer uses. :class:`_Type` decides per event type whether
this applies at all; where it does not, the caller prints that type per event.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Dict, List, Optional

import numpy as np

from vmtrace.format.fastcolumns import _TEXT, _UTF8, _bulk_field, _Group, _materialize
from vmtrace.format.plugins import applicable_plugin
from vmtrace.format.printfmt import FieldInfo, compile_print_fmt, compile_reader, field_info
from vmtrace.format.render import TextRenderer, event_name_column



_MASKS = {(1 << b) - 1: b for b in (8, 16, 32, 64)}


def _vector(node: ast.AST, kinds: Dict[str, str]) -> Optional[Any]:
    """A numpy version of the simple integer expressions codegen emits (casts, masks,
    ``a[K]``), as a function of the columns; None if ``node`` is something else."""
    if isinstance(node, ast.Name) and node.id.startswith("f_"):
        name = node.id[2:]
        if kinds.get(name) != "num":
            return None
        return lambda cols: cols[name][1]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_s" \
            and len(node.args) == 2 and isinstance(node.args[1], ast.Constant) \
            and node.args[1].value in (8, 16, 32, 64):
        inner = _vector(node.args[0], kinds)
        if inner is None:
            return None
        dt = np.dtype("i%d" % (node.args[1].value // 8))
        return lambda cols: inner(cols).astype(dt)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd) \
            and isinstance(node.right, ast.Constant) and node.right.value in _MASKS:
        inner = _vector(node.left, kinds)
        if inner is None:
            return None
        dt = np.dtype("u%d" % (_MASKS[node.right.value] // 8))
        return lambda cols: inner(cols).astype(dt)
    if isinstance(node, ast.IfExp) and isinstance(node.body, ast.Subscript) \
            and isinstance(node.orelse, ast.Constant) and node.orelse.value == 0:
        # codegen's "(f_a[K] if 0 <= K < len(f_a) else 0)" with a constant K
        sub = node.body
        if isinstance(sub.value, ast.Name) and isinstance(sub.slice, ast.Constant) \
                and isinstance(sub.slice.value, int) and sub.value.id.startswith("f_") \
                and kinds.get(sub.value.id[2:]) == "arr" \
                and ast.dump(node.test) == ast.dump(ast.parse(
                    "0 <= %d < len(%s)" % (sub.slice.value, sub.value.id), mode="eval").body):
            name, k = sub.value.id[2:], sub.slice.value

            def index(cols: Dict[str, tuple]) -> np.ndarray:
                a = cols[name][1]
                return a[:, k] if 0 <= k < a.shape[1] else np.zeros(a.shape[0], np.int64)
            return index
    return None


class _Memo(dict):
    """fn(value) per distinct value, remembered across groups (helpers are pure)."""

    def __init__(self, fn: Any, conv: Optional[str], text: bool):
        super().__init__()
        self.fn = fn
        self.conv = conv
        self.text = text        # keys are raw char data: pass the fn their text

    def __missing__(self, key: Any) -> Any:
        v = self.fn(_TEXT[key] if self.text else key)
        if self.conv:
            v = _b(v)
            if self.conv == "s!" and not v.isascii():
                raise _NotAscii()
        if len(self) >= 1 << 17:
            self.clear()
        self[key] = v
        return v


def _field_kind(fi: FieldInfo) -> str:
    if not fi.is_array:
        return "num"
    return "str" if fi.is_string else "arr"


_FVAR = re.compile(r"\bf_([A-Za-z0-9_]+)")
_CALLS = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")


class _Arg:
    """One conversion argument: how to turn gathered columns into a list of values."""

    def __init__(self, code: str, fields: Dict[str, FieldInfo], ns: dict):
        self.code = code
        # field variables (a string literal that happens to spell one only adds an
        # unused parameter)
        names = sorted({n for n in _FVAR.findall(code) if n in fields})
        self.fields = names
        kinds = {n: _field_kind(fields[n]) for n in names}
        self.direct = names[0] if len(names) == 1 and code == "f_" + names[0] else None
        self.vector = None
        if self.direct is None and set(_CALLS.findall(code)) <= {"_s", "len"}:
            self.vector = _vector(ast.parse(code, mode="eval").body, kinds)
        self.memo_field = names[0] if len(names) == 1 and kinds[names[0]] in ("num", "str") else None
        self.ns = ns
        self._fn: Any = None
        self._memos: Dict[tuple, _Memo] = {}

    @property
    def fn(self) -> Any:
        if self._fn is None:
            src = "lambda %s: %s" % (", ".join("f_" + n for n in self.fields), self.code)
            self._fn = eval(compile(src, "<bulk arg>", "eval"), self.ns)  # noqa: S307 - printfmt's code
        return self._fn

    def memo(self, conv: Optional[str], text: bool) -> _Memo:
        m = self._memos.get((conv, text))
        if m is None:
            m = self._memos[(conv, text)] = _Memo(self.fn, conv, text)
        return m

    def column(self, g: _Group, conv: Optional[str]) -> list:
        """Values for ``g``; as UTF-8 bytes when ``conv`` is "s" (a %s conversion) or
        "s!" (a %s with width or precision: then only ASCII, or _NotAscii is raised)."""
        cols = g.cols
        if self.direct is not None:
            c = cols[self.direct]
            if c[0] == "str":
                if not conv:
                    return list(map(_TEXT.__getitem__, c[1].tolist()))
                vals = list(map(_UTF8.__getitem__, c[1].tolist()))
                if conv == "s!" and not all(map(bytes.isascii, vals)):
                    raise _NotAscii()
                return vals
            vals = c[1].tolist()
            return _as_bytes(vals, conv) if conv else vals
        if self.vector is not None:
            vals = self.vector(cols).tolist()
            return _as_bytes(vals, conv) if conv else vals
        if self.memo_field is not None:
            c = cols[self.memo_field]
            return list(map(self.memo(conv, c[0] == "str").__getitem__, c[1].tolist()))
        fn = self.fn
        if not self.fields:
            vals = [fn()]
            return (_as_bytes(vals, conv) if conv else vals) * g.n
        vals = list(map(fn, *[_materialize(cols[f]) for f in self.fields]))
        return _as_bytes(vals, conv) if conv else vals


class _NotAscii(Exception):
    """A padded %s of non-ASCII text: widths count characters, so format as str."""


def _b(v: Any) -> bytes:
    if not isinstance(v, str):
        v = "%s" % (v,)
    return v.encode("utf-8", "surrogateescape")


def _as_bytes(vals: list, conv: str) -> list:
    out = list(map(_b, vals))
    if conv == "s!" and not all(map(bytes.isascii, out)):
        raise _NotAscii()
    return out




class _Type:
    """How to render one event type in bulk, or ``bulk = False`` for the per-event path."""

    def __init__(self, fmt: Any, r: TextRenderer, prefix: str):
        self.fmt = fmt
        self.bulk = False
        self.reg = None
        self.reg_read = None
        self.fmts: Dict[int, str] = {}
        if fmt is None:
            self.tail = "[UNKNOWN EVENT]".replace("%", "%%")
            self.args: List[_Arg] = []
            self.convs: List[Optional[str]] = []
            self.fields: Dict[str, FieldInfo] = {}
            self.span = 0
            self.rec = None
            self.others: list = []
            self.bulk = True
            self.prefix = prefix.replace("%", "%%")
            return
        if getattr(fmt, "endian", "<") != "<":
            return
        name = getattr(fmt, "name", "") or "(NULL)"
        infos = [field_info(f, r.long_size) for f in fmt.fields]
        by_name = {fi.name: fi for fi in infos}
        # only the format and argument expressions: the per-event renderer is made if
        # and when some event of this type needs it
        pf = compile_print_fmt(fmt.print_fmt or "", infos, symbols=r.ctx.symbol, atoms=r.ctx.address,
                               printk=r.printk_lookup, long_size=r.long_size, endian="<",
                               where=f"{fmt.system}:{name}", functions=False)
        if pf.failed or pf.namespace is None:
            pf = None
        plugin = applicable_plugin(fmt, r.ctx)
        if plugin is not None and plugin.comms:
            # learned in merged order whichever way the lines are then made
            self.reg = plugin.comms
            self.reg_read = compile_reader(fmt.fields, [n for pair in plugin.comms for n in pair],
                                           long_size=r.long_size, endian="<")
        if plugin is not None:
            bulk = plugin.bulk(fmt, pf, r.ctx) if plugin.bulk is not None else None
            if bulk is None:      # the plugin has only its per-event form (for this event)
                return
            body, codes, ns = bulk.body, list(bulk.args), bulk.namespace
        elif pf is None:
            return
        else:
            body, codes, ns = pf.body_fmt, list(pf.body_args), pf.namespace
        try:
            args = [_Arg(c, by_name, ns) for c in codes]
        except (SyntaxError, ValueError, TypeError):
            return
        convs = _conversions(body)
        if convs is None or len(convs) != len(args):
            return
        self.convs = convs
        used = sorted({f for a in args for f in a.fields} | {n for pair in self.reg or () for n in pair})
        fields = {n: by_name[n] for n in used}
        if not all(_bulk_field(fi) for fi in fields.values()):
            return
        # struct.unpack_from in the per-event path needs every scalar it reads; slices of
        # strings are clamped there, so a payload shorter than a string differs: per event.
        self.span = max([fi.offset + (4 if fi.is_dynamic else fi.size) for fi in fields.values()]
                        + [0])
        self.fields = fields
        scal = [(n, fi) for n, fi in fields.items() if not fi.is_array]
        self.rec = np.dtype({"names": [n for n, _ in scal],
                             "formats": ["<%s%d" % ("i" if fi.signed else "u", fi.size) for _, fi in scal],
                             "offsets": [fi.offset for _, fi in scal],
                             "itemsize": self.span}) if scal else None
        self.others = [(n, fi) for n, fi in fields.items() if fi.is_array]
        self.args = args
        self.tail = (event_name_column(name).replace("%", "%%") + body)
        self.prefix = prefix.replace("%", "%%")
        self.bulk = True

    def line_fmt(self, cpu: int, text_time: bool) -> bytes:
        """The line as a bytes %-format: head, time (text, or seconds and microseconds),
        then the event's own arguments."""
        key = -1 if text_time else cpu
        f = self.fmts.get(key)
        if f is None:
            if text_time:     # "[CPU] SECS.USECS" is one text column
                f = "%s%%s %%s: %s" % (self.prefix, self.tail)
            else:
                f = "%s%%s [%03d] %%5d.%%06d: %s" % (self.prefix, cpu, self.tail)
            f = self.fmts[key] = f.encode("utf-8", "surrogateescape")
        return f

    def line_fmt_str(self, cpu: int) -> str:
        return "%s%%s [%03d] %%5d.%%06d: %s" % (self.prefix, cpu, self.tail)


_PYSPEC = re.compile(r"%(\([^)]*\))?([-#0 +]*)(\*|\d+)?(?:\.(\*|\d*))?([a-zA-Z%])")


def _conversions(fmt: str) -> Optional[List[Optional[str]]]:
    """Per argument of a Python %-format: "s" (a %s), "s!" (a padded or cut %s) or None
    (a number); None for the whole format if it uses anything else."""
    out: List[Optional[str]] = []
    for m in _PYSPEC.finditer(fmt):
        key, flags, width, prec, conv = m.groups()
        if conv == "%":
            if key or flags or width or prec is not None:
                return None
            continue
        if key or conv not in "sdiouxXc":
            return None
        if width == "*":
            out.append(None)
        if prec == "*":
            out.append(None)
        if conv in "sc":
            out.append("s!" if (width or prec is not None) else "s")
        else:
            out.append(None)
    return out
