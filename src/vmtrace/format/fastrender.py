"""``trace-cmd report`` text, many events at a time: same bytes, a few times faster.

:mod:`vmtrace.format.render` formats one event per call; this module formats a whole
chunk of merged events with a handful of numpy steps and one ``%`` operation per line,
and falls back to the per-event renderer wherever bulk rendering could differ:

1. **Merge.** Each CPU's batches (:meth:`vmtrace.api.Trace.batches`) become items
   (events, plus lost-event markers placed like :mod:`vmtrace.api` places them). trace-cmd
   (and ``heapq.merge`` in the per-event path) repeatedly takes the CPU whose next item
   has the smallest timestamp, ties to the lower CPU. For streams that are sorted that
   is a stable sort by (timestamp, CPU, position); for streams whose clock steps back it
   is the same sort on each stream's running maximum of the timestamp, which is what we
   sort on. Items are released in windows: everything below the smallest "last pending
   key" of the CPUs that still have data, so memory is bounded by about one decoded
   chunk per CPU.
2. **Comm column.** trace-cmd learns task names from sched_switch/sched_wakeup as it
   prints them (a pid gets the first name seen, the event that teaches it still shows
   the old one). A pass over just those events, in merged order, gives for each pid the
   position from which its new name applies.
3. **Lines per event type.** For each (batch, event type) in a window the fields used by
   the print fmt (or plugin) are gathered into numpy columns; each conversion's argument
   becomes a column: simple casts in numpy, helper calls (flags, symbols, printk
   strings) evaluated once per distinct value, anything else per event with the same
   generated expression the per-event renderer uses. Then
   ``list(map(FMT.__mod__, zip(head, sec, usec, *args)))`` makes the lines, where FMT is
   the buffer prefix, the header layout with the CPU filled in, the padded name and the
   print fmt's own format.
4. Lines are scattered back into merged order and written in large blocks.

Payloads too short for the fields used, ``__data_loc`` strings pointing past the
payload, event types with fields or helpers not handled here, and any group whose bulk
evaluation raises go through :class:`~vmtrace.format.render.TextRenderer` unchanged.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from vmtrace.format.metadata import MAX_ADDR_DIGITS, kallsyms_text
from vmtrace.format.plugins import applicable_plugin
from vmtrace.format.printfmt import M64, FieldInfo, compile_print_fmt, compile_reader, field_info
from vmtrace.format.render import TextRenderer, event_name_column, lost_text

# Lines rendered per step: bounds the Python objects alive at once (~64k lines of text).
SUB_CHUNK = 1 << 16

_U64 = np.uint64


# --------------------------------------------------------------------------- kallsyms


class FastKallsyms:
    """The same lookups as :class:`vmtrace.format.metadata.KallSyms`, parsed with numpy.

    A regular ``/proc/kallsyms`` (16 hex digits, one space, a type letter, one space, a
    name) is read in a few array operations instead of a Python split per line; any
    other text goes to ``fallback`` (the metadata's own parser), so results never differ.
    """

    _WS = (9, 10, 11, 12, 13, 28, 29, 30, 31, 32)

    def __init__(self, raw: Any, fallback: Any):
        self._raw = raw
        self._text = raw if isinstance(raw, (bytes, bytearray, memoryview)) else None
        self._fallback = fallback
        self._addrs: Optional[np.ndarray] = None
        self._slow = False
        self._named: Dict[str, Optional[int]] = {}
        self._by_name: Optional[Dict[bytes, Optional[int]]] = None
        self._source = getattr(fallback, "source", None)     # the trace, for errors

    def address(self, name: str) -> Optional[int]:
        """A symbol's address by name (rare: print fmts naming kernel variables).

        The first line naming it, in file order (0 when kptr_restrict hid it: None). The
        index is built on the first call, in one pass: a search of the whole text per
        name cost 0.4 s each, and a print fmt can name a hundred.
        """
        if name in self._named:
            return self._named[name]
        text = self._text
        if text is not None and bytes(text[:2]) != b"\x1f\x8b":
            if self._by_name is None:
                self._by_name = _kallsyms_names(bytes(kallsyms_text(text, self._source) or b""))
            addr = self._by_name.get(name.encode())
        elif self._fallback is not None and hasattr(self._fallback, "address"):
            addr = self._fallback.address(name)
        else:
            addr = None
        self._named[name] = addr
        return addr

    def _load(self) -> None:
        raw = self._raw
        self._raw = None
        if isinstance(raw, str):
            self._slow = True
            return
        raw = bytes(raw or b"")
        if raw[:2] == b"\x1f\x8b":
            self._slow = True
            return
        parsed = _parse_kallsyms(kallsyms_text(raw, self._source))
        if parsed is None:
            self._slow = True
            return
        self._addrs, self._starts, self._ends, self._bytes = parsed

    def lookup(self, addr: int) -> Optional[tuple]:
        if self._addrs is None and not self._slow:
            self._load()
        if self._slow:
            return self._fallback.lookup(addr) if self._fallback is not None else None
        addrs = self._addrs
        if not addrs.shape[0] or addr < 0 or addr > M64:
            return None
        i = int(np.searchsorted(addrs, _U64(addr), side="right")) - 1
        if i < 0:
            return None
        start = int(addrs[i])
        nxt = int(addrs[i + 1]) if i + 1 < addrs.shape[0] else start
        size = nxt - start if nxt > start else 0
        if size and addr - start >= size:
            return None
        name = self._bytes[int(self._starts[i]):int(self._ends[i])].split(None, 1)[0].decode()
        return name, addr - start, size


def _kallsyms_names(text: bytes) -> Dict[bytes, Optional[int]]:
    """name -> address of its first ``ADDR TYPE NAME`` line (None for a zero address)."""
    out: Dict[bytes, Optional[int]] = {}
    for line in text.split(b"\n"):
        a = line.find(b" ")
        b = line.find(b" ", a + 1)
        if a <= 0 or b <= a + 1 or a > MAX_ADDR_DIGITS:
            continue
        kind = line[a + 1:b]
        if kind.split() != [kind]:
            continue
        name = line[b + 1:].split(b"\t", 1)[0].split(b" ", 1)[0]
        if name in out or not name or line[:a].strip(b"0123456789abcdefABCDEF"):
            continue
        out[name] = int(line[:a], 16) or None
    return out


def _parse_kallsyms(raw: bytes) -> Optional[tuple]:
    """(sorted addresses, name starts, line ends, text) or None if not regular.

    Regular means what the per-line parser would read as ``addr type name [mod]`` with
    exactly one space between the first three: then the name is the bytes from column
    19 to the next space or tab, read when a lookup needs it.
    """
    empty = (np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64), raw)
    if not raw:
        return empty
    # bytes str.splitlines()/split() treat specially; non-ASCII decodes with replacement
    if not raw.isascii() or any(bytes([c]) in raw for c in b"\r\x0b\x0c\x1c\x1d\x1e\x1f"):
        return None
    a = np.frombuffer(raw, np.uint8)
    nl = np.flatnonzero(a == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [a.shape[0]]))
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if not starts.shape[0]:
        return empty
    if (ends - starts < 20).any():
        return None
    if not (a[starts + 16] == 32).all() or not (a[starts + 18] == 32).all():
        return None
    for col in (a[starts + 17], a[starts + 19]):
        if ((col == 32) | (col == 9)).any():
            return None
    lut = np.full(256, 255, np.uint8)
    lut[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
    lut[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
    digits = lut[np.lib.stride_tricks.sliding_window_view(a, 16)[starts]]
    if (digits == 255).any():
        return None
    addrs = np.zeros(starts.shape[0], np.uint64)
    four = np.uint64(4)
    for k in range(16):
        addrs = (addrs << four) | digits[:, k]
    nz = addrs != 0
    addrs, nstart, ends = addrs[nz], (starts + 19)[nz], ends[nz]
    order = np.argsort(addrs, kind="stable")
    return addrs[order], nstart[order], ends[order], raw


# --------------------------------------------------------------------------- columns

# Column kinds: ("num", 1-D int array) ("arr", 2-D int array) ("str", raw text per row:
# an "S" array or an object array of bytes; the text is what precedes the first NUL).
_STRUCT_OK = (1, 2, 4, 8)


def _bulk_field(fi: FieldInfo) -> bool:
    if not fi.is_array:
        return fi.size in _STRUCT_OK
    if fi.is_string:
        return fi.is_dynamic or fi.size > 0
    return (not fi.is_dynamic) and fi.size > 0 and fi.elsize in _STRUCT_OK


class _TextMemo(dict):
    """raw char data -> the str the per-event path makes of it (cut at NUL, UTF-8)."""

    def __missing__(self, raw: bytes) -> str:
        i = raw.find(b"\0")
        v = (raw if i < 0 else raw[:i]).decode("utf-8", "replace")
        if len(self) >= 1 << 16:
            self.clear()
        self[raw] = v
        return v


class _Utf8Memo(dict):
    """raw char data -> that text encoded as output bytes."""

    def __missing__(self, raw: bytes) -> bytes:
        v = _TEXT[raw].encode("utf-8", "surrogateescape")
        if len(self) >= 1 << 16:
            self.clear()
        self[raw] = v
        return v


_TEXT = _TextMemo()
_UTF8 = _Utf8Memo()


class _Group:
    """Fields of some events of one type, gathered from one batch."""

    def __init__(self, seg: "_Seg", offs: np.ndarray, lens: np.ndarray, ty: "_Type"):
        n = self.n = offs.shape[0]
        self.cols: Dict[str, tuple] = {}
        span = ty.span
        short = lens < span
        bad = short
        if span and n:
            if short.any():
                offs = np.where(short, 0, offs)
            rows = seg.window(span)[offs]
        else:
            rows = np.zeros((n, max(span, 0)), np.uint8)
        if ty.rec is not None:
            rec = rows.view(ty.rec).reshape(n)
            for name in ty.rec.names:
                self.cols[name] = ("num", rec[name])
        for name, fi in ty.others:
            o, s = fi.offset, fi.size
            if fi.is_string and not fi.is_dynamic:
                self.cols[name] = ("str", np.ascontiguousarray(rows[:, o:o + s]).view("S%d" % s).reshape(n))
            elif fi.is_string:
                col, b = _dyn_strings(seg, rows, offs, lens, fi, short)
                bad = bad | b
                self.cols[name] = col
            else:
                es = fi.elsize
                cnt = s // es
                dt = np.dtype("<%s%d" % ("i" if fi.signed else "u", es))
                blk = np.ascontiguousarray(rows[:, o:o + cnt * es]).view(dt).reshape(n, cnt)
                self.cols[name] = ("arr", blk)
        self.bad = bad


def _dyn_strings(seg: "_Seg", rows: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                 fi: FieldInfo, short: np.ndarray) -> Tuple[tuple, np.ndarray]:
    """__data_loc strings: the location word of each row, then one gather of the text
    (rows padded to the longest with NULs, which the text stops at anyway)."""
    n = offs.shape[0]
    o = fi.offset
    w = np.ascontiguousarray(rows[:, o:o + 4]).view("<u4").reshape(n).astype(np.int64)
    start = (w & 0xFFFF) + (o + 4 if fi.is_rel else 0)
    length = w >> 16
    bad = (start + length > lens) | short
    length = np.where(bad, 0, length)
    absolute = np.where(bad, 0, offs + start)
    longest = int(length.max()) if n else 0
    if longest == 0:
        return ("str", np.zeros(n, "S1")), bad
    if n * longest <= 1 << 22 and int(absolute.max()) + longest <= seg.raw.shape[0]:
        block = seg.window(longest)[absolute]
        block[np.arange(longest)[None, :] >= length[:, None]] = 0
        return ("str", block.view("S%d" % longest).reshape(n)), bad
    out = np.empty(n, dtype=object)
    out[:] = [b""] * n
    for L in np.unique(length[length > 0]).tolist():
        idx = np.flatnonzero(length == L)
        out[idx] = seg.window(L)[absolute[idx]].view("S%d" % L).reshape(-1).tolist()
    return ("str", out), bad


def _materialize(col: tuple) -> list:
    if col[0] == "str":
        return list(map(_TEXT.__getitem__, col[1].tolist()))
    return col[1].tolist()


# --------------------------------------------------------------------------- argument plans

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


def _objects(vals: list) -> np.ndarray:
    """A 1-D object array of ``vals`` (np.array would nest tuples and lists)."""
    if not vals or isinstance(vals[0], (str, bytes, int)):
        a = np.array(vals, dtype=object)
        if a.ndim == 1 and a.shape[0] == len(vals):
            return a
    out = np.empty(len(vals), dtype=object)
    for i, v in enumerate(vals):
        out[i] = v
    return out


# --------------------------------------------------------------------------- per event type


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


# --------------------------------------------------------------------------- merge


class _Seg:
    """Pending items of one batch: keys (running max of ts), codes (event i, or ~marker)."""

    __slots__ = ("batch", "cpu", "keys", "codes", "markers", "pids", "lo", "raw", "_wins")

    def __init__(self, batch: Any, cpu: int, keys: np.ndarray, codes: np.ndarray,
                 markers: list, pids: np.ndarray):
        self.batch, self.cpu, self.keys, self.codes = batch, cpu, keys, codes
        self.markers, self.pids, self.lo = markers, pids, 0
        self.raw = np.frombuffer(batch.data, np.uint8)
        self._wins: Dict[int, np.ndarray] = {}

    def window(self, span: int) -> np.ndarray:
        """Rows of ``span`` bytes starting at any offset (a view, no copy)."""
        w = self._wins.get(span)
        if w is None:
            raw = self.raw
            if raw.shape[0] < span:
                raw = np.zeros(span, np.uint8)
            w = self._wins[span] = np.lib.stride_tricks.as_strided(
                raw, (raw.shape[0] - span + 1, span), (1, 1), writeable=False)
        return w


class _Stream:
    def __init__(self, cpu: int, batches: Iterator[Any], owner: "FastReport"):
        self.cpu = cpu
        self.it = batches
        self.owner = owner
        self.done = False
        self.segs: List[_Seg] = []
        self.carry = 0

    def pending(self) -> int:
        return sum(s.keys.shape[0] - s.lo for s in self.segs)

    def last(self) -> int:
        s = self.segs[-1]
        return int(s.keys[-1])

    def load(self) -> None:
        while True:
            b = next(self.it, None)
            if b is None:
                self.done = True
                return
            seg = self.owner._segment(b, self.cpu, self)
            if seg is not None:
                self.segs.append(seg)
                return


class FastReport:
    """All lines of one buffer's report, as text blocks (see the module text)."""

    def __init__(self, trace: Any, buffer: Any, cpus: Optional[List[int]] = None,
                 renderer: Optional[TextRenderer] = None):
        self.trace = trace
        self.buffer = buffer
        self.prefix = f"{buffer.name}: " if buffer.name else ""
        ks = FastKallsyms(getattr(trace.source, "kallsyms", None),
                          getattr(trace.metadata, "kallsyms", None))
        self.r = renderer or TextRenderer(trace.metadata, long_size=trace.source.long_size,
                                          kallsyms=ks)
        self.comms = self.r.comms
        self.types: Dict[int, _Type] = {}
        self.heads: Dict[Tuple[int, str], str] = {}
        self.pid_off, self.pid_size = _pid_field(trace.catalog)
        self.after_drop: set = set()
        self.cpus = cpus
        self.counts = {"bulk": 0, "per_event": 0}   # lines each way (tests, tuning)

    # -- items of one batch -------------------------------------------------------
    def _segment(self, b: Any, cpu: int, st: _Stream) -> Optional[_Seg]:
        n = len(b)
        lost = sorted(b.lost)
        ts = b.ts
        if not lost:
            keys = ts
            codes = np.arange(n, dtype=np.int64)
            markers: list = []
        else:
            markers = [(m.count,) for m in lost]
            idx = np.array([m.index for m in lost], np.int64)
            inside = idx < n
            at = np.minimum(idx, n)
            codes = np.insert(np.arange(n, dtype=np.int64), at, ~np.arange(len(lost), dtype=np.int64))
            mkeys = np.empty(len(lost), np.uint64)
            if inside.any():
                mkeys[inside] = ts[idx[inside]]
            off = self.trace.ts_offset
            for k in np.flatnonzero(~inside).tolist():
                mkeys[k] = (lost[k].ts + off) % (1 << 64)
            keys = np.insert(ts, at, mkeys)
        if keys.shape[0] == 0:
            return None
        keys = np.maximum.accumulate(keys)
        if st.carry:
            keys = np.maximum(keys, _U64(st.carry))
        st.carry = int(keys[-1])
        return _Seg(b, cpu, keys, codes, markers, self._pids(b))

    def _pids(self, b: Any) -> np.ndarray:
        n = len(b)
        if n == 0:
            return np.zeros(0, np.int64)
        off, size = self.pid_off, self.pid_size
        raw = np.frombuffer(b.data, np.uint8)
        ok = b.length >= off + size
        win = np.lib.stride_tricks.sliding_window_view(raw, size)
        vals = np.ascontiguousarray(win[np.where(ok, b.offset + off, 0)]).view("<i%d" % size)
        return np.where(ok, vals.reshape(-1).astype(np.int64), -1)

    # -- the merge ----------------------------------------------------------------
    def _windows(self) -> Iterator[Tuple[List[_Seg], np.ndarray, np.ndarray]]:
        """(segments, segment index per item, code per item) in merged order."""
        cpus = sorted(c.cpu for c in self.buffer.cpus
                      if self.cpus is None or c.cpu in self.cpus)
        streams = [_Stream(c, self.trace.batches(c, self.buffer.name), self) for c in cpus]
        while True:
            for s in streams:
                while not s.done and not s.segs:
                    s.load()
            live = [s for s in streams if not s.done]
            # Everything below the smallest last pending key is final. An item at that
            # key is final too unless a CPU with a lower number can still bring one at
            # the same key (only CPUs whose last pending key is that key can).
            limit = min(s.last() for s in live) if live else None
            tie_cpu = min(s.cpu for s in live if s.last() == limit) if live else None
            pieces = []
            for s in streams:
                while s.segs:
                    seg = s.segs[0]
                    if limit is None:
                        end = seg.keys.shape[0]
                    else:
                        end = int(np.searchsorted(seg.keys, _U64(limit),
                                                  side="right" if s.cpu <= tie_cpu else "left"))
                    if end > seg.lo:
                        pieces.append((seg, seg.lo, end))
                        seg.lo = end
                    if seg.lo >= seg.keys.shape[0]:
                        s.segs.pop(0)
                        continue
                    break
            if pieces:
                segs = []
                seg_ix = []
                keys = []
                codes = []
                for k, (seg, lo, hi) in enumerate(pieces):
                    segs.append(seg)
                    seg_ix.append(np.full(hi - lo, k, np.int32))
                    keys.append(seg.keys[lo:hi])
                    codes.append(seg.codes[lo:hi])
                keys_a = np.concatenate(keys)
                order = np.argsort(keys_a, kind="stable")
                yield segs, np.concatenate(seg_ix)[order], np.concatenate(codes)[order]
            if not live:
                return

    # -- rendering ------------------------------------------------------------------
    def blocks(self) -> Iterator[bytes]:
        for segs, seg_ix, codes in self._windows():
            for a in range(0, seg_ix.shape[0], SUB_CHUNK):
                yield self._render(segs, seg_ix[a:a + SUB_CHUNK], codes[a:a + SUB_CHUNK])

    def _type(self, tid: int) -> _Type:
        t = self.types.get(tid)
        if t is None:
            t = self.types[tid] = _Type(self.trace.catalog.get(tid), self.r, self.prefix)
        return t

    def _render(self, segs: List[_Seg], seg_ix: np.ndarray, codes: np.ndarray) -> bytes:
        n = seg_ix.shape[0]
        is_ev = codes >= 0
        pid = np.zeros(n, np.int64)
        tid = np.zeros(n, np.int64)
        ts = np.zeros(n, np.uint64)
        cpu = np.zeros(n, np.int64)
        present = np.flatnonzero(np.bincount(seg_ix, minlength=len(segs))).tolist()
        for k in present:
            seg = segs[k]
            m = seg_ix == k
            cpu[m] = seg.cpu
            me = m & is_ev
            e = codes[me]
            pid[me] = seg.pids[e]
            tid[me] = seg.batch.type_id[e]
            ts[me] = seg.batch.ts[e]
        out = np.empty(n, dtype=object)
        # groups of (segment, type), each in merged order: a counting sort
        ev_pos = np.flatnonzero(is_ev)
        gkey = seg_ix[ev_pos].astype(np.int64) * 65536 + tid[ev_pos]
        # Dense group numbers from the keys present: a table indexed by the key itself
        # had 65536 entries per segment, 1 GB for a window of 2000 CPUs' chunks.
        ukeys, ginv = np.unique(gkey, return_inverse=True)
        counts = np.bincount(ginv.reshape(-1), minlength=ukeys.shape[0])
        gorder = np.argsort(ginv.reshape(-1), kind="stable")
        bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
        groups = []
        for g, key in enumerate(ukeys.tolist()):
            P = ev_pos[gorder[bounds[g]:bounds[g + 1]]]
            groups.append((segs[key >> 16], key & 0xFFFF, P))
        # 1. what each group's fields are (also feeds the comm pass)
        gathered = []
        regs = []
        for seg, t, P in groups:
            ty = self._type(t)
            gr = None
            bulk = ty.bulk
            if bulk and ty.fmt is not None:
                b = seg.batch
                E = codes[P]
                try:
                    gr = _Group(seg, b.offset[E], b.length[E].astype(np.int64), ty)
                except (ValueError, TypeError, IndexError):
                    bulk = False
            gathered.append((seg, ty, P, gr, bulk))
            if ty.reg is not None:
                regs.append(self._registrations(seg, ty, P, codes, gr))
        newly = self._learn(regs) if regs else {}
        # 2. the comm-pid column
        heads = self._heads(pid, is_ev, newly)
        # 3. time columns
        times = _Times(ts, cpu)
        # 4. lines; with the CPU in the time text, one event type's groups of all CPUs
        # are formatted together
        if times.text is not None:
            gathered = self._merged(gathered, out, heads, times)
        for seg, ty, P, gr, bulk in gathered:
            lines = None
            if bulk:
                try:
                    lines = self._bulk_lines(seg, ty, P, gr, heads, times, codes)
                except (ValueError, TypeError, OverflowError, KeyError, IndexError, ZeroDivisionError):
                    lines = None
            if lines is None:
                lines = self._slow_lines(seg, ty, P, codes, heads, times)
            else:
                self.counts["bulk"] += len(lines)
                lines = _strip_trailing_newline(lines)
            out[P] = lines
        # 5. lost-event markers; the next event of that CPU carries no buffer prefix
        mk = np.flatnonzero(~is_ev)
        for p in mk.tolist():
            seg = segs[int(seg_ix[p])]
            out[p] = (self.prefix + lost_text(seg.cpu, seg.markers[~int(codes[p])][0])).encode(
                "utf-8", "surrogateescape")
        if self.prefix and (mk.shape[0] or self.after_drop):
            self._strip_after_drop(out, cpu, is_ev, mk)
        lines = out.tolist()
        lines.append(b"")
        return b"\n".join(lines)

    def _merged(self, gathered: list, out: np.ndarray, heads: np.ndarray, times: "_Times") -> list:
        """Format same-type groups of different chunks at once; return the others."""
        by_type: Dict[int, list] = {}
        rest = []
        for e in gathered:
            seg, ty, P, gr, bulk = e
            if bulk and gr is not None and ty.fmt is not None and not gr.bad.any():
                by_type.setdefault(id(ty), []).append(e)
            else:
                rest.append(e)
        for entries in by_type.values():
            if len(entries) == 1:
                rest.append(entries[0])
                continue
            P = np.concatenate([e[2] for e in entries])
            try:
                gr = _concat_groups([e[3] for e in entries])
                lines = self._format(entries[0][0], entries[0][1], P, gr, heads, times,
                                     allow_str=False)
            except (ValueError, TypeError, OverflowError, KeyError, IndexError,
                    ZeroDivisionError, _NotAscii):
                rest.extend(entries)
                continue
            self.counts["bulk"] += len(lines)
            out[P] = lines
        return rest

    def _bulk_lines(self, seg: _Seg, ty: _Type, P: np.ndarray, gr: Optional[_Group],
                    heads: np.ndarray, times: "_Times", codes: np.ndarray) -> Optional[list]:
        if gr is None:     # unknown event: header only
            F = ty.line_fmt(seg.cpu, times.text is not None)
            return list(map(F.__mod__, zip(heads[P].tolist(), *times.cols(P))))
        if gr.bad.any():
            return None if gr.bad.all() else self._mixed(seg, ty, P, gr, heads, times, codes)
        return self._format(seg, ty, P, gr, heads, times)

    def _format(self, seg: _Seg, ty: _Type, P: np.ndarray, gr: _Group, heads: np.ndarray,
                times: "_Times", allow_str: bool = True) -> list:
        hl = heads[P].tolist()
        try:
            cols = [a.column(gr, c) for a, c in zip(ty.args, ty.convs)]
            F = ty.line_fmt(seg.cpu, times.text is not None)
            return list(map(F.__mod__, zip(hl, *times.cols(P), *cols)))
        except _NotAscii:
            if not allow_str:
                raise
        # padded non-ASCII text: pad characters, as the per-event renderer does
        sl, ul = times.ints(P)
        cols = [a.column(gr, None) for a in ty.args]
        Fs = ty.line_fmt_str(seg.cpu)
        hs = [h.decode("utf-8", "surrogateescape") for h in hl]
        return [line.encode("utf-8", "surrogateescape")
                for line in map(Fs.__mod__, zip(hs, sl, ul, *cols))]

    def _mixed(self, seg: _Seg, ty: _Type, P: np.ndarray, gr: _Group, heads: np.ndarray,
               times: "_Times", codes: np.ndarray) -> list:
        """Some rows too short for bulk: render the good ones in bulk, the rest per event."""
        good = ~gr.bad
        sub = _Group.__new__(_Group)
        sub.n = int(good.sum())
        sub.bad = np.zeros(sub.n, bool)
        sub.cols = {k: (c[0], c[1][good]) for k, c in gr.cols.items()}
        res = np.empty(P.shape[0], dtype=object)
        res[good] = self._format(seg, ty, P[good], sub, heads, times)
        res[gr.bad] = self._slow_lines(seg, ty, P[gr.bad], codes, heads, times)
        return res.tolist()

    def _slow_lines(self, seg: _Seg, ty: _Type, P: np.ndarray, codes: np.ndarray,
                    heads: np.ndarray, times: "_Times") -> list:
        """The per-event renderer, for what bulk rendering does not cover."""
        self.counts["per_event"] += P.shape[0]
        b = seg.batch
        E = codes[P].tolist()
        data = memoryview(b.data)
        fmt = ty.fmt
        pre = self.prefix
        c = seg.cpu
        out = []
        hl = [h.decode("utf-8", "surrogateescape") for h in heads[P].tolist()]
        sl, ul = times.ints(P)
        if fmt is None:
            for h, s, u in zip(hl, sl, ul):
                out.append("%s%s [%03d] %5d.%06d: [UNKNOWN EVENT]" % (pre, h, c, s, u))
        else:
            col = event_name_column(getattr(fmt, "name", "") or "(NULL)")
            info = self.r.info
            bo, bl = b.offset, b.length
            for e, h, s, u in zip(E, hl, sl, ul):
                o = int(bo[e])
                p = data[o:o + int(bl[e])]
                out.append("%s%s [%03d] %5d.%06d: %s%s" % (pre, h, c, s, u, col, info(fmt, p)))
        return [line.encode("utf-8", "surrogateescape") for line in out]

    # -- comm learning ----------------------------------------------------------------
    def _registrations(self, seg: _Seg, ty: _Type, P: np.ndarray, codes: np.ndarray,
                       gr: Optional[_Group]) -> tuple:
        """(positions*2+k, pids, comms) this group registers, in its own order."""
        pairs = ty.reg
        if gr is not None and not gr.bad.any():
            pos, pids, names = [], [], []
            for k, (pf, cf) in enumerate(pairs):
                pos.append(P.astype(np.int64) * 2 + k)
                pids.append(gr.cols[pf][1].astype(np.int64))
                names.append(_objects(_materialize(gr.cols[cf])))
            return np.concatenate(pos), np.concatenate(pids), np.concatenate(names)
        # some payloads are short: read each as the plugin does (it registers only if
        # its read succeeds)
        read = ty.reg_read
        b = seg.batch
        data = memoryview(b.data)
        pos, pids, names = [], [], []
        for p, e in zip(P.tolist(), codes[P].tolist()):
            o = int(b.offset[e])
            try:
                v = read(data[o:o + int(b.length[e])])
            except Exception:  # noqa: BLE001 - the plugin's guard catches these too
                continue
            for k in range(len(pairs)):
                pos.append(p * 2 + k)
                pids.append(v[2 * k])
                names.append(v[2 * k + 1])
        return (np.array(pos, np.int64), np.array(pids, np.int64), _objects(names))

    def _learn(self, regs: list) -> Dict[int, int]:
        pos = np.concatenate([r[0] for r in regs])
        pids = np.concatenate([r[1] for r in regs])
        names = np.concatenate([r[2] for r in regs])
        order = np.argsort(pos, kind="stable")
        comms = self.comms
        newly: Dict[int, int] = {}
        for p, pid, name in zip(pos[order].tolist(), pids[order].tolist(), names[order].tolist()):
            if pid and pid not in comms:
                comms[pid] = name
                newly[pid] = p >> 1
        return newly

    def _heads(self, pid: np.ndarray, is_ev: np.ndarray, newly: Dict[int, int]) -> np.ndarray:
        u, inv = _unique_small(pid)
        comms = self.comms
        cache = self.heads
        final = np.empty(u.shape[0], dtype=object)
        before = None
        reg = None
        ul = u.tolist()
        for i, p in enumerate(ul):
            name = "<idle>" if p == 0 else comms.get(p, "<...>")
            h = cache.get((p, name))
            if h is None:
                h = cache[(p, name)] = _b("%16s-%-5d" % (name, p))
            final[i] = h
        if newly:
            before = final.copy()
            reg = np.full(u.shape[0], -1, np.int64)
            for i, p in enumerate(ul):
                if p in newly:
                    reg[i] = newly[p]
                    before[i] = _b("%16s-%-5d" % ("<...>", p))
            heads = final[inv]
            use_before = np.arange(pid.shape[0]) <= reg[inv]
            if use_before.any():
                heads[use_before] = before[inv][use_before]
            return heads
        return final[inv]

    def _strip_after_drop(self, out: np.ndarray, cpu: np.ndarray, is_ev: np.ndarray,
                          mk: np.ndarray) -> None:
        L = len(_b(self.prefix))
        todo = set(cpu[mk].tolist()) | self.after_drop
        for c in sorted(todo):
            idx = np.flatnonzero(cpu == c)
            if not idx.shape[0]:
                continue
            kinds = is_ev[idx]
            prev_marker = np.concatenate(([c in self.after_drop], ~kinds[:-1]))
            for p in idx[kinds & prev_marker].tolist():
                out[p] = out[p][L:]
            if kinds[-1]:
                self.after_drop.discard(c)
            else:
                self.after_drop.add(c)


class _Times:
    """The time column (``%5lu.%06lu`` of the rounded microseconds) of a render step.

    When every second count has the same printed width, the text is built with numpy
    digit arithmetic and formatted as one ``%s``; otherwise as two integers."""

    def __init__(self, ts: np.ndarray, cpu: np.ndarray):
        n = ts.shape[0]
        self.text: Optional[np.ndarray] = None
        if n and int(ts.max()) > M64 - 1000:
            us = np.array([(int(x) + 500) // 1000 for x in ts.tolist()], dtype=object)
            self.secs, self.usecs = us // 1000000, us % 1000000
            return
        us = (ts + _U64(500)) // _U64(1000)
        secs, usecs = us // _U64(1000000), us % _U64(1000000)
        self.secs, self.usecs = secs, usecs
        if not n:
            return
        lo, hi = len(str(int(secs.min()))), len(str(int(secs.max())))
        width = max(5, hi)
        if max(5, lo) != width or int(cpu.max()) > 999 or int(cpu.min()) < 0:
            return
        m = np.empty((n, width + 13), np.uint8)
        m[:, 0], m[:, 4], m[:, 5] = 91, 93, 32        # "[ddd] "
        c = cpu.astype(np.int64)
        for k in range(3):
            c, d = np.divmod(c, 10)
            m[:, 3 - k] = d + 48
        full = m
        m = full[:, 6:]
        m[:, width] = 46
        u = usecs.astype(np.uint32)
        ten = np.uint32(10)
        for k in range(6):
            u, d = np.divmod(u, ten)
            m[:, width + 6 - k] = d
        m[:, width + 1:] += 48
        s = secs
        ten64 = np.uint64(10)
        for k in range(width):
            if k and not s.any():
                m[:, :width - k] = 32
                break
            s, d = np.divmod(s, ten64)
            m[:, width - 1 - k] = d + 48
            if k:
                lead = (s == 0) & (d == 0)
                if lead.any():
                    m[lead, width - 1 - k] = 32
        self.text = full.view("S%d" % (width + 13)).reshape(n)

    def cols(self, P: np.ndarray) -> list:
        if self.text is not None:
            return [self.text[P].tolist()]
        return [self.secs[P].tolist(), self.usecs[P].tolist()]

    def ints(self, P: np.ndarray) -> Tuple[list, list]:
        return self.secs[P].tolist(), self.usecs[P].tolist()


def _concat_groups(groups: List[_Group]) -> _Group:
    """One group of the rows of several (same event type, other chunks)."""
    g = _Group.__new__(_Group)
    g.n = sum(x.n for x in groups)
    g.bad = np.zeros(g.n, bool)
    g.cols = {}
    for name, c in groups[0].cols.items():
        parts = [x.cols[name][1] for x in groups]
        if c[0] == "str" and any(p.dtype == object for p in parts):
            parts = [p.astype(object) for p in parts]
        g.cols[name] = (c[0], np.concatenate(parts))
    return g


def _unique_small(v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """np.unique(v, return_inverse=True) for ints, by counting when their range is small."""
    if v.shape[0]:
        lo, hi = int(v.min()), int(v.max())
        if hi - lo < max(1 << 16, 4 * v.shape[0]):
            x = v - lo
            seen = np.bincount(x, minlength=hi - lo + 1) > 0
            u = np.flatnonzero(seen)
            lut = np.zeros(seen.shape[0], np.intp)
            lut[u] = np.arange(u.shape[0])
            return u + lo, lut[x]
    u, inv = np.unique(v, return_inverse=True)
    return u, inv.reshape(-1)


def _pid_field(catalog: Any) -> Tuple[int, int]:
    for ev_id in catalog.ids():
        fmt = catalog.get(ev_id)
        f = fmt.field("common_pid") if fmt else None
        if f is not None and f.size in (1, 2, 4, 8):
            return f.offset, f.size
    return 4, 4


def supported(trace: Any) -> bool:
    """Whether :class:`FastReport` renders this trace (else use the per-event path)."""
    return trace.source.endian in ("<", "little")


def report_blocks(trace: Any, buffer: Any, cpus: Optional[List[int]] = None) -> Iterator[bytes]:
    """UTF-8 blocks (each ending in a newline) of the report of one buffer, no header."""
    yield from FastReport(trace, buffer, cpus).blocks()


def _strip_trailing_newline(lines: list) -> list:
    """Drop one trailing newline per line, as trace-cmd does (trace_marker texts end in one).

    The per-event path does this in TextRenderer.info; here a joined probe finds out in
    C whether any line of the group needs it before paying for a Python-level pass.
    """
    if not lines or b"\n\x00" not in b"\x00".join(lines) + b"\x00":
        return lines
    return [ln[:-1] if ln.endswith(b"\n") else ln for ln in lines]
