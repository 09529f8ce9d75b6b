"""Print fmt text to Python: the code generator and :func:`compile_print_fmt`.

Generated once per event type and ``exec``-ed, so printing an event costs one call and
one ``%`` operation. Integer expressions carry their known width and signedness, so
masks C would apply implicitly are emitted only where they can change the value, and
constant sub-expressions (flag tables) are folded at compile time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from vmtrace.errors import FormatError
from vmtrace.format.printfmt.cexpr import _Parser, _tokenize, _Unsupported
from vmtrace.format.printfmt.fields import FieldInfo, field_info, payload_reader
from vmtrace.format.printfmt.fmtstring import _parse_format, split_print_fmt
from vmtrace.format.printfmt.limits import M64, MAX_PRINT_FMT
from vmtrace.format.printfmt.runtime import _HELPERS, _s, _text

# Symbol resolution the renderer injects: address -> (name, start address) or None;
# and printk_formats: address -> string or None.
SymbolLookup = Callable[[int], Optional[tuple]]
PrintkLookup = Callable[[int], Optional[str]]

# Helper functions a print fmt may call, and the fewest arguments each needs.
_MIN_ARGS = {
    "__get_str": 1, "__get_rel_str": 1, "__get_dynamic_array": 1, "__get_rel_dynamic_array": 1,
    "__get_sockaddr": 1, "__get_sockaddr_rel": 1, "__get_dynamic_array_len": 1,
    "__get_rel_dynamic_array_len": 1, "__get_bitmask": 1, "__get_rel_bitmask": 1,
    "__get_cpumask": 1, "__get_rel_cpumask": 1,
}

# Names libtraceevent evaluates in __print_flags/__print_symbolic tables.
_KNOWN_FLAGS = {"HI_SOFTIRQ": 0, "TIMER_SOFTIRQ": 1, "NET_TX_SOFTIRQ": 2, "NET_RX_SOFTIRQ": 3,
                "BLOCK_SOFTIRQ": 4, "IRQ_POLL_SOFTIRQ": 5, "TASKLET_SOFTIRQ": 6,
                "SCHED_SOFTIRQ": 7, "HRTIMER_SOFTIRQ": 8, "RCU_SOFTIRQ": 9,
                "HRTIMER_NORESTART": 0, "HRTIMER_RESTART": 1}

_FOLDED: dict = {}


def _fold(code: str, consts: Mapping[str, Any]) -> Any:
    """Value of a constant expression; the same flag masks recur in many print fmts
    (every kmem event spells out the GFP table), so results are remembered."""
    if "_k" in code:        # refers to this format's own constants
        return eval(code, dict(_HELPERS, **consts), {})  # noqa: S307 - generated code
    hit = _FOLDED.get(code, _FOLDED)
    if hit is _FOLDED:
        if len(_FOLDED) > 1 << 16:
            _FOLDED.clear()
        hit = _FOLDED[code] = eval(code, dict(_HELPERS), {})  # noqa: S307 - generated code
    return hit


class _Gen:
    """Turns AST nodes into Python expressions over local variables f_<field>."""

    def __init__(self, fields: Mapping[str, FieldInfo], long_size: int,
                 atoms: Optional[Callable[[str], Optional[int]]] = None):
        self.fields = fields
        self.long_size = long_size
        self.atoms = atoms
        self.consts: dict[str, Any] = {}
        self.used: set[str] = set()

    def const(self, value: Any) -> str:
        name = "_k%d" % len(self.consts)
        self.consts[name] = value
        return name

    def fieldvar(self, name: str) -> str:
        if name not in self.fields:
            raise _Unsupported(f"unknown field {name!r}")
        self.used.add(name)
        return "f_" + name

    # kind: "int", "str", "list", "any"; rng: (bits, signed) known for ints, else None
    def num(self, node) -> tuple[str, Optional[tuple[int, bool]]]:
        code, kind, rng = self.gen(node)
        if kind == "int":
            return code, rng
        if kind == "list":
            return "0", (32, True)
        return "_num(%s)" % code, None

    def gen(self, node) -> tuple[str, str, Optional[tuple[int, bool]]]:
        code, kind, rng = self._gen(node)
        if kind == "int" and node[0] in ("bin", "un", "cast", "tern") and "f_" not in code:
            try:   # fold constant arithmetic (flag masks) once, at compile time
                val = _fold(code, self.consts)
            except Exception:
                return code, kind, rng
            if isinstance(val, int):
                return repr(val), kind, rng
        return code, kind, rng

    def _gen(self, node) -> tuple[str, str, Optional[tuple[int, bool]]]:
        t = node[0]
        if t == "num":
            return repr(node[1]), "int", None
        if t == "str":
            return repr(node[1]), "str", None
        if t == "atom":
            if node[1] in ("true", "false"):
                return ("1" if node[1] == "true" else "0"), "int", None
            # a kernel variable (vmemmap_base): its kallsyms address, as libtraceevent
            # does; without kallsyms it stays an atom and counts as 0
            addr = self.atoms(node[1]) if self.atoms is not None else None
            if addr is not None:
                return repr(addr), "int", (64, False)
            return self.const(node[1]), "atom", None
        if t == "field":
            fi = self.fields.get(node[1])
            var = self.fieldvar(node[1])
            if fi.is_string:
                return var, "str", None
            if fi.is_array:
                return var, "list", None
            return var, "int", (fi.size * 8, fi.signed)
        if t == "cast":
            ty, e = node[1], node[2]
            code, kind, rng = self.gen(e)
            if ty is None or kind not in ("int",):
                return code, kind, rng
            bits, signed = ty
            if rng and rng[0] <= bits and (rng[1] == signed or (not rng[1] and rng[0] < bits)):
                return code, kind, rng
            if signed:
                return "_s(%s, %d)" % (code, bits), "int", ty
            return "(%s & %d)" % (code, (1 << bits) - 1), "int", ty
        if t == "un":
            op = node[1]
            if op in ("*", "&"):
                raise _Unsupported(f"unary {op}")
            code, _ = self.num(node[2])
            if op == "!":
                return "(0 if %s else 1)" % code, "int", None
            if op == "+":
                return code, "int", None
            return "((%s%s) & %d)" % (op, code, M64), "int", (64, False)
        if t == "bin":
            op = node[1]
            if op in ("&&", "||"):
                a, _ = self.num(node[2])
                b, _ = self.num(node[3])
                pyop = "and" if op == "&&" else "or"
                return "(1 if (%s %s %s) else 0)" % (a, pyop, b), "int", None
            a, ra = self.num(node[2])
            b, rb = self.num(node[3])
            # libtraceevent computes in unsigned long long: wrap like it does
            if op == "/":
                return "_udiv(%s, %s)" % (a, b), "int", (64, False)
            if op == "%":
                return "_umod(%s, %s)" % (a, b), "int", (64, False)
            if op == ">>":
                return "((%s & %d) >> (%s & 63))" % (a, M64, b), "int", (64, False)
            if op in ("<<", "+", "-", "*"):
                return "((%s %s %s) & %d)" % (a, op, b if op != "<<" else "(%s & 63)" % b, M64), "int", (64, False)
            if op in ("==", "!=", "<", ">", "<=", ">="):
                return "(1 if %s %s %s else 0)" % (a, op, b), "int", None
            rng = None
            if op == "&" and (ra and not ra[1] or rb and not rb[1]):
                rng = min([r for r in (ra, rb) if r and not r[1]])
            return "(%s %s %s)" % (a, op, b), "int", rng
        if t == "tern":
            c, _ = self.num(node[1])
            a, ka, ra = self.gen(node[2])
            b, kb, rb = self.gen(node[3])
            kind = ka if ka == kb else "any"
            return "(%s if %s else %s)" % (a, c, b), kind, (ra if ra == rb else None)
        if t == "index":
            base, kind, _ = self.gen(node[1])
            idx, _ = self.num(node[2])
            if kind != "list":
                raise _Unsupported("index of a non-array")
            return "(%s[%s] if 0 <= %s < len(%s) else 0)" % (base, idx, idx, base), "int", None
        if t == "call":
            return self.call(node[1], node[2])
        if t == "member":
            raise _Unsupported("member access")
        if t == "brace":
            raise FormatError("print fmt: {...} outside __print_flags/__print_symbolic")
        raise FormatError(f"print fmt: cannot evaluate {t}")

    def _field_arg(self, node) -> FieldInfo:
        """The field named by a helper's argument (bare name or REC->name)."""
        if node[0] in ("atom", "field"):
            fi = self.fields.get(node[1])
            if fi is None:
                raise _Unsupported(f"unknown field {node[1]!r}")
            return fi
        if node[0] == "call" and node[1] in ("__get_dynamic_array", "__get_rel_dynamic_array") \
                and node[2]:
            return self._field_arg(node[2][0])
        raise _Unsupported("helper argument is not a field")

    def _buffer(self, node) -> tuple[str, int]:
        fi = self._field_arg(node)
        return self.fieldvar(fi.name), (fi.elsize if fi.is_array else fi.size)

    def _table(self, items, flags: bool):
        out = []
        for it in items:
            if it[0] != "brace":
                raise FormatError("print fmt: flag/symbol entry is not {value, \"name\"}")
            if len(it[1]) != 2:
                continue    # "{}" or other filler the kernel's macros leave behind
            if it[1][1][0] != "str":
                continue    # the kernel's { 0, NULL } end marker
            if it[1][0][0] == "atom":
                # libtraceevent knows a few names; any other one evaluates to -1
                out.append((_KNOWN_FLAGS.get(it[1][0][1], -1), it[1][1][1]))
                continue
            vcode, _ = self.num(it[1][0])
            try:
                val = _fold(vcode, self.consts)  # constants only: no field is in scope
            except Exception as exc:
                raise _Unsupported(f"non-constant flag value ({exc})")
            name = it[1][1]
            if name[0] != "str":
                raise FormatError("print fmt: flag/symbol name is not a string")
            out.append((_s(val, 64), name[1]))
        return out

    def call(self, name: str, args: list):
        if len(args) < _MIN_ARGS.get(name, 0):
            raise FormatError(f"print fmt: {name}() needs {_MIN_ARGS[name]} argument(s), "
                              f"has {len(args)}")
        if name in ("__get_str", "__get_rel_str"):
            fi = self._field_arg(args[0])
            return self.fieldvar(fi.name), ("str" if fi.is_string else "any"), None
        if name in ("__get_dynamic_array", "__get_rel_dynamic_array", "__get_sockaddr",
                    "__get_sockaddr_rel"):
            fi = self._field_arg(args[0])
            return self.fieldvar(fi.name), "list", None
        if name in ("__get_dynamic_array_len", "__get_rel_dynamic_array_len"):
            fi = self._field_arg(args[0])
            return "len(%s) * %d" % (self.fieldvar(fi.name), fi.elsize if not fi.is_string else 1), "int", None
        if name in ("__get_bitmask", "__get_rel_bitmask", "__get_cpumask", "__get_rel_cpumask"):
            var, el = self._buffer(args[0])
            return "_bitmask(%s, %d)" % (var, el), "str", None
        if name in ("__print_flags", "__print_flags_u64"):
            if len(args) < 2:
                raise FormatError("print fmt: __print_flags needs a value and a delimiter")
            val, _ = self.num(args[0])
            delim = args[1][1] if args[1][0] == "str" else ""
            table = tuple(self._table(args[2:], True))
            return "_flags(%s, %r, %s)" % (val, delim, self.const(table)), "str", None
        if name in ("__print_symbolic", "__print_symbolic_u64"):
            if not args:
                raise FormatError("print fmt: __print_symbolic needs a value")
            val, _ = self.num(args[0])
            table: dict = {}
            for v, s in self._table(args[1:], False):
                table.setdefault(v, s)
            return "_symbolic(%s, %s)" % (val, self.const(table)), "str", None
        if name in ("__print_hex", "__print_hex_str"):
            if len(args) != 2:
                raise FormatError(f"print fmt: {name} needs 2 arguments")
            var, el = self._buffer(args[0])
            n, _ = self.num(args[1])
            sep = " " if name == "__print_hex" else ""
            return "_hex(%s, %d, %s, %r)" % (var, el, n, sep), "str", None
        if name == "__print_array":
            if len(args) != 3:
                raise FormatError("print fmt: __print_array needs 3 arguments")
            var, el = self._buffer(args[0])
            count, _ = self.num(args[1])
            size, _ = self.num(args[2])
            return "_array(%s, %d, %s, %s)" % (var, el, count, size), "str", None
        if name in ("__builtin_expect",) and args:
            return self.gen(args[0])
        if name == "jiffies_to_msecs" and len(args) == 1:  # trace-cmd's jbd2 plugin: identity
            code, rng = self.num(args[0])
            return code, "int", None
        raise _Unsupported(f"function {name}()")


_LEN_BITS = {"hh": 8, "h": 16, "": 32, "l": 64, "ll": 64, "L": 64, "z": 64, "Z": 64,
             "j": 64, "t": 64}


def _needs_mask(rng: Optional[tuple[int, bool]], bits: int, signed: bool) -> bool:
    if rng is None:
        return True
    rb, rs = rng
    if rs == signed and rb <= bits:
        return False
    if not rs and signed and rb < bits:
        return False
    return True


@dataclass
class PrintFmt:
    """One event's compiled print fmt.

    ``render(values)`` takes the decoded fields (ints, str for char arrays, lists for
    other arrays) and returns the text libtraceevent would print. When libtraceevent
    could not have parsed the format either, ``failed`` says why and ``render`` is None.
    """
    text: str
    fmt: str
    fields: tuple = ()
    failed: Optional[str] = None
    source: str = ""
    render: Optional[Callable[[Mapping[str, Any]], str]] = None
    render_payload: Optional[Callable[[Any], str]] = None
    used_fields: tuple = ()
    # For renderers that format many events at once (vmtrace.format.fastrender): the
    # Python %-format of the text (literal % already doubled), one Python expression
    # over f_<field> variables per conversion, and the globals those expressions need.
    body_fmt: str = ""
    body_args: tuple = ()
    namespace: Optional[dict] = None


def compile_print_fmt(
    text: str,
    fields: Iterable[Any] = (),
    *,
    symbols: Optional[SymbolLookup] = None,
    printk: Optional[PrintkLookup] = None,
    long_size: int = 8,
    endian: str = "<",
    where: str = "print fmt",
    functions: bool = True,
    atoms: Optional[Callable[[str], Optional[int]]] = None,
) -> PrintFmt:
    """Compile ``text`` (the part after ``print fmt:``) for an event with ``fields``.

    With ``functions=False`` only the format and argument expressions are made (for
    renderers that evaluate them in bulk): ``render``/``render_payload`` stay None.
    """
    if len(text) > MAX_PRINT_FMT:
        raise FormatError(f"{where}: print fmt is {len(text)} bytes, more than {MAX_PRINT_FMT}")
    infos = {}
    for f in fields:
        fi = f if isinstance(f, FieldInfo) else field_info(f, long_size)
        infos[fi.name] = fi
    # A print fmt libtraceevent cannot parse is not an error in the trace: trace-cmd
    # prints such events as "[FAILED TO PARSE]" plus raw fields, and so do we.
    try:
        fmt, argtext = split_print_fmt(text)
    except FormatError as exc:
        return PrintFmt(text=text, fmt="", fields=tuple(infos.values()), failed=exc.what)
    pf = PrintFmt(text=text, fmt=fmt, fields=tuple(infos.values()))
    try:
        args = _Parser(_tokenize(argtext)).args() if argtext.strip() else []
        src, consts, used, body = _codegen(fmt, args, infos, long_size, endian, atoms)
    except (_Unsupported, FormatError) as exc:
        pf.failed = str(exc)
        return pf
    except RecursionError:
        pf.failed = "expression nested too deeply"
        return pf
    glb = dict(_HELPERS)
    glb.update(consts)
    glb["_symf"] = _make_sym(symbols, True)
    glb["_syms"] = _make_sym(symbols, False)
    glb["_printk"] = _make_printk(printk)
    if functions:
        ns: dict = {}
        try:
            code = compile(src, "<print fmt>", "exec")
        except (SyntaxError, RecursionError, MemoryError) as exc:
            # The parser's bounds should keep this from happening; if a text still makes
            # code CPython will not compile, that one event type is FAILED TO PARSE.
            pf.failed = f"print fmt: cannot compile ({type(exc).__name__})"
            return pf
        exec(code, glb, ns)  # noqa: S102 - our own generated code
        pf.render = ns["_render"]
        pf.render_payload = ns["_render_payload"]
    pf.source = src
    pf.used_fields = tuple(sorted(used))
    pf.body_fmt, pf.body_args = body[0], tuple(body[1])
    pf.namespace = glb
    return pf


def _make_sym(symbols: Optional[SymbolLookup], with_offset: bool) -> Callable[[Any], str]:
    def sym(v: Any) -> str:
        if not isinstance(v, int):
            return ""
        v &= M64
        hit = symbols(v) if symbols else None
        if not hit:
            return "0x%x" % v
        name, start = hit[0], hit[1]
        return "%s+0x%x" % (name, v - start) if with_offset else name
    return sym


def _make_printk(printk: Optional[PrintkLookup]) -> Callable[[Any], str]:
    def lookup(v: Any) -> str:
        if not isinstance(v, int):
            return _text(v)
        v &= M64
        s = printk(v) if printk else None
        return s if s is not None else "%x" % v
    return lookup


def _codegen(fmt: str, args: list, infos: Mapping[str, FieldInfo], long_size: int,
             endian: str = "<", atoms: Optional[Callable[[str], Optional[int]]] = None):
    g = _Gen(infos, long_size, atoms)
    pieces = _parse_format(fmt)
    out_fmt = []
    out_args = []
    ai = 0

    def next_arg():
        nonlocal ai
        if ai >= len(args):
            raise _Unsupported("more conversions than arguments")
        a = args[ai]
        ai += 1
        return a

    for p in pieces:
        if isinstance(p, str):
            out_fmt.append(p.replace("%", "%%"))
            continue
        width = p.width
        prec = p.prec
        wcode = pcode = None
        if width == "*":
            wcode, _ = g.num(next_arg())
        if prec == "*":
            pcode, _ = g.num(next_arg())
        node = next_arg()
        spec_w = ("*" if width == "*" else (width or ""))
        spec_p = ("" if prec is None else "." + ("*" if prec == "*" else prec))
        if wcode is not None:
            out_args.append("_width(%s)" % wcode)
        if pcode is not None:
            out_args.append("max(0, _width(%s))" % pcode)
        conv = p.conv
        if conv == "p":
            code, kind, _ = g.gen(node)
            if node[0] == "str" or kind == "str" and p.ext == "":
                out_fmt.append("%s")
                out_args.append(code)
                continue
            ext = p.ext[:1]
            if ext in ("S", "F"):
                expr = "_symf(%s)" % code
            elif ext in ("s", "f"):
                expr = "_syms(%s)" % code
            elif ext in ("M", "m", "I", "i", "U", "h"):
                fi = None
                try:
                    fi = g._field_arg(node)
                except _Unsupported:
                    pass
                el = fi.elsize if fi and fi.is_array else (fi.size if fi else 1)
                helper = {"M": "_mac", "m": "_mac", "U": "_uuid", "h": "_hex"}.get(ext)
                if ext in ("I", "i"):
                    helper = "_ip6" if "6" in p.ext else "_ip4"
                if helper == "_hex":
                    expr = "_hex(%s, %d, %d, ' ')" % (code, el, 64)
                else:
                    expr = "%s(%s, %d)" % (helper, code, el)
            else:
                expr = "_ptr(%s)" % code
            out_fmt.append("%" + p.flags.replace("0", "").replace("#", "") + spec_w + "s")
            out_args.append(expr)
            continue
        if conv == "s":
            code, kind, rng = g.gen(node)
            if kind == "int" and node[0] == "field" and infos[node[1]].size == long_size:
                code = "_printk(%s)" % code
            elif kind != "str":
                code = "_text(%s)" % code
            out_fmt.append("%" + p.flags.replace("0", "") + spec_w + spec_p + "s")
            out_args.append(code)
            continue
        if conv == "n":
            raise _Unsupported("%n")
        code, rng = g.num(node)
        bits = _LEN_BITS.get(p.length, 32)
        if conv == "c":
            out_fmt.append("%" + p.flags.replace("0", "") + spec_w + "s")
            out_args.append("chr(%s & 255)" % code)
            continue
        signed = conv in ("d", "i")
        if _needs_mask(rng, bits, signed):
            code = ("_s(%s, %d)" % (code, bits)) if signed else ("(%s & %d)" % (code, (1 << bits) - 1))
        pyconv = {"i": "d", "u": "d"}.get(conv, conv)
        spec = "%" + p.flags + spec_w + spec_p + pyconv
        if "#" in p.flags and conv in ("x", "X", "o"):
            if "*" in spec:
                raise _Unsupported("'#' with '*'")
            out_fmt.append("%s")
            out_args.append("_alt_hex(%s, %r)" % (code, spec))
            continue
        out_fmt.append(spec)
        out_args.append(code)
    if ai < len(args):
        # libtraceevent ignores extra arguments; they are still evaluated for errors only
        pass
    fmt_text = "".join(out_fmt)
    if out_args:
        ret = "    return %r %% (%s,)" % (fmt_text, ", ".join(out_args))
    else:
        ret = "    return %r" % fmt_text.replace("%%", "%")
    lines = ["def _render(v):"]
    for name in sorted(g.used):
        fi = infos[name]
        default = "''" if fi.is_string else ("()" if fi.is_array else "0")
        lines.append("    f_%s = v.get(%r, %s)" % (name, name, default))
    lines.append(ret)
    plines, pconsts = payload_reader(list(infos.values()), g.used, endian)
    g.consts.update(pconsts)
    lines.append("def _render_payload(p):")
    lines.extend(plines)
    lines.append(ret)
    return "\n".join(lines) + "\n", g.consts, g.used, (fmt_text, out_args)
