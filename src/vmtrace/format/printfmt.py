"""Compile an event's ``print fmt`` into a Python function that renders it.

The kernel describes how to print each event as a C format string plus C argument
expressions (``REC->field``, ``__print_flags(...)``, casts, ternaries...). trace-cmd
interprets that text with libtraceevent every time it prints an event. We instead
translate it once per event type into Python source and ``exec`` it, so printing an
event costs one call and one ``%`` operation: that is what lets text output keep pace
with trace-cmd.

Where C and libtraceevent have a particular behaviour we copy the behaviour, not the
code: integers are masked to the width the conversion implies (``%d`` of a u64 prints
the low 32 bits, signed), ``%p`` of zero prints ``(nil)``, ``%s`` of a pointer-sized
field looks the address up in ``printk_formats``, ``__print_flags`` leaves unknown bits
as ``0x...``. A print fmt libtraceevent cannot handle (an unknown helper function) is
marked ``failed`` so the renderer can print ``[FAILED TO PARSE]`` like trace-cmd does.

Guest data is untrusted: the generated code never indexes outside what it was given,
and the compiler raises FormatError (one line) on text it cannot parse.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from vmtrace.errors import FormatError

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1

# Symbol resolution the renderer injects: address -> (name, start address) or None;
# and printk_formats: address -> string or None.
SymbolLookup = Callable[[int], Optional[tuple]]
PrintkLookup = Callable[[int], Optional[str]]

# Limits that keep a hostile format or payload from costing unbounded time or memory.
MAX_PRINT_FMT = 256 * 1024
MAX_HEX_BYTES = 64 * 1024
# Nesting of the argument expressions (calls, operators, unary operators, casts,
# parentheses together). Real print fmts nest under 20; the generated Python adds about
# two levels per level here and CPython's parser stops at 200 parentheses.
MAX_DEPTH = 64
# Field width and precision, written or passed with '*': the kernel's formats pad to 16
# at most; trace-cmd would pad to any width, so 10 events of %100000000u made 2 GB.
MAX_WIDTH = 256
# Conversions in one print fmt (the kernel's longest has ~25): with MAX_WIDTH, what one
# event can print is bounded by the print fmt and the payload, not by a number in them.
MAX_CONVERSIONS = 64
# An integer literal is at most 64 bits, so at most 22 octal digits; int() refuses
# 4300+ decimal digits with a ValueError instead.
MAX_LITERAL_DIGITS = 24

# Helper functions a print fmt may call, and the fewest arguments each needs.
_MIN_ARGS = {
    "__get_str": 1, "__get_rel_str": 1, "__get_dynamic_array": 1, "__get_rel_dynamic_array": 1,
    "__get_sockaddr": 1, "__get_sockaddr_rel": 1, "__get_dynamic_array_len": 1,
    "__get_rel_dynamic_array_len": 1, "__get_bitmask": 1, "__get_rel_bitmask": 1,
    "__get_cpumask": 1, "__get_rel_cpumask": 1,
}


# --------------------------------------------------------------------------- tokens

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>0[xX][0-9a-fA-F]+[uUlL]*|[0-9]+[uUlL]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<chr>'(?:[^'\\]|\\.)+')
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>->|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^~!<>?:,(){}\[\].])
    """,
    re.VERBOSE,
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0",
            "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unescape(body: str) -> str:
    out = []
    i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c == "\\" and i + 1 < n:
            nxt = body[i + 1]
            if nxt == "x":
                m = re.match(r"[0-9a-fA-F]{1,2}", body[i + 2:])
                if m:
                    out.append(chr(int(m.group(0), 16)))
                    i += 2 + len(m.group(0))
                    continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _tokenize(text: str) -> list[tuple[str, str]]:
    toks = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if not m:
            raise FormatError(f"print fmt: unexpected character {text[pos]!r} at column {pos}")
        kind = m.lastgroup
        if kind != "ws":
            toks.append((kind, m.group(0)))
        pos = m.end()
    return toks


# --------------------------------------------------------------------------- parser
# AST nodes are tuples: ("num", int) ("str", s) ("atom", name) ("field", name)
# ("call", name, [args]) ("brace", [items]) ("cast", (bits, signed) | None, e)
# ("un", op, e) ("bin", op, a, b) ("tern", c, a, b) ("index", e, i)

_TYPE_WORDS = {
    "unsigned", "signed", "int", "long", "short", "char", "void", "bool", "_Bool",
    "struct", "enum", "union", "const", "volatile",
    "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64",
    "__u8", "__u16", "__u32", "__u64", "__s8", "__s16", "__s32", "__s64",
}

_TYPEDEF_SIZES = {
    "u8": (8, False), "u16": (16, False), "u32": (32, False), "u64": (64, False),
    "__u8": (8, False), "__u16": (16, False), "__u32": (32, False), "__u64": (64, False),
    "s8": (8, True), "s16": (16, True), "s32": (32, True), "s64": (64, True),
    "__s8": (8, True), "__s16": (16, True), "__s32": (32, True), "__s64": (64, True),
    "bool": (8, False), "_Bool": (8, False), "gfp_t": (32, False), "pid_t": (32, True),
    "size_t": (64, False), "ssize_t": (64, True), "dev_t": (32, False),
    "__le16": (16, False), "__le32": (32, False), "__le64": (64, False),
    "__be16": (16, False), "__be32": (32, False), "__be64": (64, False),
    "uint8_t": (8, False), "uint16_t": (16, False), "uint32_t": (32, False),
    "uint64_t": (64, False), "int8_t": (8, True), "int16_t": (16, True),
    "int32_t": (32, True), "int64_t": (64, True), "loff_t": (64, True),
    "sector_t": (64, False), "blk_opf_t": (32, False), "ino_t": (64, False),
    "uint": (32, False), "ulong": (64, False), "ushort": (16, False), "uchar": (8, False),
}

_SIZEOF = {"int": 4, "unsigned": 4, "long": 8, "short": 2, "char": 1,
           "u64": 8, "__u64": 8, "s64": 8, "__s64": 8, "u32": 4, "__u32": 4, "s32": 4,
           "__s32": 4, "u16": 2, "__u16": 2, "s16": 2, "__s16": 2, "u8": 1, "__u8": 1,
           "s8": 1}

_BINARY_PREC = {
    "||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6,
    "<": 7, ">": 7, "<=": 7, ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9,
    "*": 10, "/": 10, "%": 10,
}


def _type_of(words: list[str], pointer: bool) -> Optional[tuple[int, bool]]:
    """(bits, signed) of a C type named by ``words``, None when unknown (no-op cast)."""
    if pointer:
        return (64, False)
    ws = [w for w in words if w not in ("const", "volatile")]
    if not ws:
        return None
    if ws[0] in ("struct", "enum", "union"):
        return (32, True) if ws[0] == "enum" else None
    if len(ws) == 1 and ws[0] in _TYPEDEF_SIZES:
        return _TYPEDEF_SIZES[ws[0]]
    signed = "unsigned" not in ws
    if "char" in ws:
        return (8, signed)
    if "short" in ws:
        return (16, signed)
    if ws.count("long") >= 1:
        return (64, signed)
    if "int" in ws or ws in (["unsigned"], ["signed"]):
        return (32, signed)
    return None


# libtraceevent's operator priorities (smaller binds tighter).
_TEP_PRIO = {"*": 6, "/": 6, "%": 6, "+": 7, "-": 7, "<<": 8, ">>": 8, "<": 9, ">": 9,
             "<=": 9, ">=": 9, "==": 10, "!=": 10, "&": 11, "^": 12, "|": 13, "&&": 14,
             "||": 15, "?": 16}


class _Op:
    __slots__ = ("op", "left", "right", "prio")

    def __init__(self, op: str, left: "_Box", right: Optional["_Box"], prio: int):
        self.op, self.left, self.right, self.prio = op, left, right, prio


class _Box:
    """A mutable slot: libtraceevent rewrites operands in place while associating."""
    __slots__ = ("v",)

    def __init__(self, v: Any):
        self.v = v

    def build(self) -> Any:
        return _finish(self.v)


class _Done(tuple):
    """A node already turned into plain tuples (a whole argument): not walked again."""
    __slots__ = ()


def _finish(v: Any) -> Any:
    """Turn the in-place association tree into the plain tuples codegen reads."""
    if type(v) is _Done:
        return v
    if isinstance(v, _Op):
        left = v.left.build()
        right = v.right.build() if v.right is not None else ("num", 0)
        if v.op == "?":
            return ("tern", left, right[1], right[2])
        return ("bin", v.op, left, right)
    if isinstance(v, _Box):
        return v.build()
    if isinstance(v, tuple):
        return tuple(_finish(x) for x in v)
    if isinstance(v, list):
        return [_finish(x) for x in v]
    return v


def _literal(tok: str) -> int:
    """A C integer literal (decimal, 0x hex, 0 octal) that fits in 64 bits."""
    digits = tok.rstrip("uUlL")
    if digits[:2] in ("0x", "0X"):
        base, body = 16, digits[2:]
    elif len(digits) > 1 and digits[0] == "0":
        base, body = 8, digits[1:]
    else:
        base, body = 10, digits
    if len(body) > MAX_LITERAL_DIGITS or (base == 8 and body.strip("01234567")):
        raise FormatError(f"print fmt: bad integer literal {tok[:30]!r}")
    value = int(body, base)
    if value > M64:
        raise FormatError(f"print fmt: integer literal {tok[:30]!r} does not fit in 64 bits")
    return value


class _Parser:
    def __init__(self, toks: list[tuple[str, str]]):
        self.toks = toks
        self.i = 0
        self.depth = 0

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def take(self) -> tuple[str, str]:
        t = self.peek()
        self.i += 1
        return t

    def expect(self, text: str) -> None:
        t = self.take()
        if t[1] != text:
            raise FormatError(f"print fmt: expected {text!r}, found {t[1] or 'end'!r}")

    def args(self) -> list:
        out = []
        while self.peek()[0] != "eof":
            out.append(self.expr())
            if self.peek()[1] == ",":
                self.take()
            elif self.peek()[0] != "eof":
                raise FormatError(f"print fmt: unexpected {self.peek()[1]!r} after argument")
        return out

    def expr(self):
        """A full argument, associated the way libtraceevent's parser does it.

        libtraceevent reads ``a OP b`` with ``b`` a single operand and, when that operand
        is itself an operation of lower precedence (parentheses do not protect it), rotates
        the two; a following operator of equal or higher precedence binds to the right
        operand. So ``x & (A | B)`` means ``(x & A) | B`` and ``a - b - c`` means
        ``a - (b - c)``. trace-cmd prints what that tree evaluates to; so do we.
        """
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormatError("print fmt: expression nested too deeply")
        v = self.raw_expr()
        self.depth -= 1
        v = _finish(v)
        return _Done(v) if type(v) is tuple else v

    def raw_expr(self) -> Any:
        box = _Box(self.unary())
        while self._is_op(self.peek()):
            self._process_op(box, self.take()[1])
        return box.v

    @staticmethod
    def _is_op(tok: tuple[str, str]) -> bool:
        return tok[0] == "op" and (tok[1] in _BINARY_PREC or tok[1] == "?")

    def _process_op(self, box: "_Box", op: str) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormatError("print fmt: expression nested too deeply")
        if op == "?":
            cond = _Box(box.v)
            a = self.expr()
            self.expect(":")
            b = self.expr()
            box.v = _Op("?", cond, _Box(("pair", a, b)), 0)
            right = None
        else:
            node = _Op(op, _Box(box.v), None, _TEP_PRIO[op])
            rbox = _Box(self.unary())
            r = rbox.v
            if isinstance(r, _Op) and _TEP_PRIO[op] < _TEP_PRIO.get(r.op, 0):
                node.right = r.left
                right = _Box(node)
                box.v = _Op(r.op, right, r.right, r.prio)
            else:
                node.right = rbox
                box.v = node
                right = rbox
        nxt = self.peek()
        if self._is_op(nxt):
            self.take()
            if _TEP_PRIO[nxt[1]] > box.v.prio or right is None:
                self._process_op(box, nxt[1])
            else:
                self._process_op(right, nxt[1])
        self.depth -= 1

    def _cast_ahead(self) -> Optional[int]:
        """If a cast starts at '(' here, return the index of its ')'."""
        j = self.i + 1
        words = []
        while j < len(self.toks):
            kind, tok = self.toks[j]
            if kind == "id":
                words.append(tok)
            elif tok == "*" and words:
                pass
            elif tok == ")":
                break
            else:
                return None
            j += 1
        else:
            return None
        if not words:
            return None
        first = words[0]
        nxt = self.toks[j + 1] if j + 1 < len(self.toks) else ("eof", "")
        if first in _TYPE_WORDS or first.endswith("_t") or first in _TYPEDEF_SIZES:
            if nxt[0] in ("id", "num", "str", "chr") or nxt[1] in ("(", "~", "!", "-"):
                return j
            return None
        # "(uint)(x)": an unknown name in parentheses followed by an operand is a cast
        if first != "REC" and (nxt[0] in ("id", "num") or nxt[1] == "("):
            return j
        return None

    def _deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormatError("print fmt: expression nested too deeply")

    def unary(self):
        kind, tok = self.peek()
        if kind == "op" and tok in ("-", "+", "!", "~", "*", "&"):
            self.take()
            self._deeper()
            node = ("un", tok, self.unary())
            self.depth -= 1
            return node
        if kind == "op" and tok == "(":
            close = self._cast_ahead()
            if close is not None:
                words = [t for k, t in self.toks[self.i + 1:close] if k == "id"]
                pointer = any(t == "*" for _, t in self.toks[self.i + 1:close])
                self.i = close + 1
                self._deeper()
                node = ("cast", _type_of(words, pointer), self.unary())
                self.depth -= 1
                return node
        if kind == "id" and tok == "sizeof":
            self.take()
            return ("num", self.sizeof())
        return self.postfix(self.primary())

    def sizeof(self) -> int:
        self.expect("(")
        words = []
        depth = 1
        while True:
            kind, tok = self.take()
            if kind == "eof":
                raise FormatError("print fmt: unterminated sizeof")
            if tok == "(":
                depth += 1
            elif tok == ")":
                depth -= 1
                if depth == 0:
                    break
            words.append(tok)
        if "*" in words:
            return 8
        for w in words:
            if w == "long" and words.count("long") >= 1:
                return 8
            if w in _SIZEOF:
                return _SIZEOF[w]
        raise _Unsupported(f"sizeof({' '.join(words)})")

    def primary(self):
        kind, tok = self.take()
        if kind == "num":
            return ("num", _literal(tok))
        if kind == "str":
            s = _unescape(tok[1:-1])
            while self.peek()[0] == "str":
                s += _unescape(self.take()[1][1:-1])
            return ("str", s)
        if kind == "chr":
            body = _unescape(tok[1:-1])
            return ("num", ord(body[0]) if body else 0)
        if kind == "id":
            if tok == "REC" and self.peek()[1] == "->":
                self.take()
                k2, name = self.take()
                if k2 != "id":
                    raise FormatError("print fmt: expected a field name after REC->")
                return ("field", name)
            if self.peek()[1] == "(":
                self.take()
                args = []
                if self.peek()[1] != ")":
                    while True:
                        args.append(self.expr())
                        if self.peek()[1] == ",":
                            self.take()
                            continue
                        break
                self.expect(")")
                return ("call", tok, args)
            return ("atom", tok)
        if tok == "(":
            self._deeper()
            e = self.raw_expr()     # unbuilt: parentheses do not stop libtraceevent's rotation
            self.expect(")")
            self.depth -= 1
            return e
        if tok == "{":
            items = []
            while self.peek()[1] != "}":
                items.append(self.expr())
                if self.peek()[1] == ",":
                    self.take()
                elif self.peek()[1] != "}":
                    raise FormatError(f"print fmt: unexpected {self.peek()[1]!r} in {{...}}")
            self.take()
            return ("brace", items)
        raise FormatError(f"print fmt: unexpected {tok or 'end of text'!r}")

    def postfix(self, node):
        while True:
            tok = self.peek()[1]
            if tok == "[":
                self.take()
                idx = self.expr()
                self.expect("]")
                node = ("index", node, idx)
            elif tok in ("->", ".") and self.peek(1)[0] == "id":
                self.take()
                name = self.take()[1]
                if node == ("atom", "REC") and tok == "->":
                    node = ("field", name)
                else:
                    node = ("member", node, name)
            elif tok in ("->", "."):
                raise FormatError(f"print fmt: expected a name after {tok!r}")
            else:
                return node


class _Unsupported(Exception):
    """Something libtraceevent would also refuse; the event prints as FAILED TO PARSE."""


# --------------------------------------------------------------------------- format string

_SPEC = re.compile(r"%([-+ #0]*)(\*|\d+)?(?:\.(\*|\d+))?(hh|h|ll|l|L|z|Z|j|t)?([diouxXcspn%])")


@dataclass
class _Conv:
    flags: str
    width: Optional[str]
    prec: Optional[str]
    length: str
    conv: str
    ext: str = ""       # pointer extension: S s F f M m I4 U h ...


def _parse_format(fmt: str) -> list:
    """Split a C format into literal strings and _Conv items, libtraceevent style."""
    out: list = []
    pos = 0
    lit = []
    n = len(fmt)
    while pos < n:
        c = fmt[pos]
        if c != "%":
            lit.append(c)
            pos += 1
            continue
        if fmt.startswith("%%", pos):
            lit.append("%")
            pos += 2
            continue
        m = _SPEC.match(fmt, pos)
        if not m:
            # libtraceevent prints an unknown conversion as >c< and moves on
            j = pos + 1
            while j < n and fmt[j] in "-+ #0123456789.*hlLzZ":
                j += 1
            lit.append(">%s<" % (fmt[j] if j < n else ""))
            pos = j + 1
            continue
        if m.group(5) == "%":
            # "%" with flags or a width between ("% %"): C prints a '%' and takes no
            # argument; passing the spec on made Python's % operator raise
            lit.append("%")
            pos = m.end()
            continue
        if lit:
            out.append("".join(lit))
            lit = []
        conv = _Conv(m.group(1), m.group(2), m.group(3), m.group(4) or "", m.group(5))
        for num in (conv.width, conv.prec):
            if num not in (None, "*") and (len(num) > 4 or int(num) > MAX_WIDTH):
                raise FormatError(f"print fmt: width or precision {num[:12]} is more than {MAX_WIDTH}")
        if sum(isinstance(p, _Conv) for p in out) >= MAX_CONVERSIONS:
            raise FormatError(f"print fmt: more than {MAX_CONVERSIONS} conversions")
        pos = m.end()
        if conv.conv == "p":
            conv.ext = _pointer_ext(fmt, pos)
            pos += len(conv.ext)
        out.append(conv)
    if lit:
        out.append("".join(lit))
    return out


def _pointer_ext(fmt: str, pos: int) -> str:
    """How many letters after %p belong to the pointer extension (libtraceevent's rules)."""
    s = fmt[pos:pos + 6]
    if not s:
        return ""
    c = s[0]
    if c in "FSfs":
        return c
    if c in "Mm":
        return s[:2] if s[1:2] in ("R", "F") else c
    if c in "Ii":
        if s[1:2] == "4":
            return s[:3] if s[2:3] in ("h", "n", "l", "b") else s[:2]
        if s[1:2] == "6":
            return s[:3] if s[2:3] == "c" else s[:2]
        if s[1:2] == "S":
            j = 2
            while j < len(s) and s[j] in "pfs":
                j += 1
            if j < len(s) and s[j] in "hnlb":
                j += 1
            if j < len(s) and s[j] == "c":
                j += 1
            return s[:j]
        return s[:2] if len(s) > 1 else c
    if c == "U":
        return s[:2] if s[1:2] in ("L", "l", "B", "b") else c
    if c == "h":
        return s[:2] if s[1:2] in ("C", "D", "N") else c
    return ""


def split_print_fmt(text: str) -> tuple[str, str]:
    """Split ``"format", args`` into the unescaped format and the argument text."""
    t = text.strip()
    if t.startswith("print fmt:"):
        t = t[len("print fmt:"):].strip()
    if not t.startswith('"'):
        raise FormatError("print fmt: does not start with a string")
    parts = []
    pos = 0
    while pos < len(t) and t[pos] == '"':
        m = re.compile(r'"((?:[^"\\]|\\.)*)"').match(t, pos)
        if not m:
            raise FormatError("print fmt: unterminated string")
        parts.append(_unescape(m.group(1)))
        pos = m.end()
        while pos < len(t) and t[pos].isspace():
            pos += 1
    rest = t[pos:].strip()
    if rest.startswith(","):
        rest = rest[1:]
    elif rest:
        raise FormatError(f"print fmt: expected ',' after the format, found {rest[:20]!r}")
    return "".join(parts), rest


# --------------------------------------------------------------------------- runtime helpers
# Called by generated code; each is small and total (never raises on odd values).


def _s(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _width(v: int) -> int:
    """A '*' width or precision from the payload, as C's int, within +-MAX_WIDTH."""
    return max(-MAX_WIDTH, min(MAX_WIDTH, _s(v, 32)))


def _ptr(v: Any) -> str:
    if not isinstance(v, int):
        return "(nil)"
    v &= M64
    return "0x%x" % v if v else "(nil)"


def _alt_hex(v: int, spec: str) -> str:
    """C's '#' flag: 0x only for non-zero values (Python always adds it)."""
    return (spec % v) if v else (spec.replace("#", "") % 0)


# Names libtraceevent evaluates in __print_flags/__print_symbolic tables.
_KNOWN_FLAGS = {"HI_SOFTIRQ": 0, "TIMER_SOFTIRQ": 1, "NET_TX_SOFTIRQ": 2, "NET_RX_SOFTIRQ": 3,
                "BLOCK_SOFTIRQ": 4, "IRQ_POLL_SOFTIRQ": 5, "TASKLET_SOFTIRQ": 6,
                "SCHED_SOFTIRQ": 7, "HRTIMER_SOFTIRQ": 8, "RCU_SOFTIRQ": 9,
                "HRTIMER_NORESTART": 0, "HRTIMER_RESTART": 1}


def _flags(val: Any, delim: str, table: tuple) -> str:
    if not isinstance(val, int):
        return ""
    val = _s(val, 64)
    out = []
    for fval, name in table:
        if not val and fval < 0:    # libtraceevent's rule, so an unknown name shows for 0
            out.append(name)
            break
        if fval > 0 and (val & fval) == fval:
            out.append(name)
            val &= ~fval
    if val:
        out.append("0x%x" % (val & M64))
    return delim.join(out)


def _symbolic(val: Any, table: dict) -> str:
    if not isinstance(val, int):
        return ""
    v = _s(val, 64)
    name = table.get(v)
    if name is None:
        return "0x%x" % (v & M64)
    return name


def _as_bytes(v: Any, elsize: int) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode("latin-1", "replace")
    if isinstance(v, (list, tuple)):
        if elsize <= 1:
            return bytes(x & 0xFF for x in v)
        mask = (1 << (8 * elsize)) - 1
        return b"".join((x & mask).to_bytes(elsize, "little") for x in v)
    if isinstance(v, int):
        return (v & M64).to_bytes(8, "little")
    return b""


def _hex(v: Any, elsize: int, n: Any, sep: str) -> str:
    data = _as_bytes(v, elsize)
    n = n if isinstance(n, int) else 0
    n = max(0, min(n, len(data), MAX_HEX_BYTES))
    return sep.join("%02x" % b for b in data[:n])


def _array(v: Any, elsize: int, count: Any, el: Any) -> str:
    data = _as_bytes(v, elsize)
    count = count if isinstance(count, int) else 0
    el = el if isinstance(el, int) else 1
    if el not in (1, 2, 4, 8):
        return "{BAD SIZE:%d 0x%x}" % (el, data[0] if data else 0)
    count = max(0, min(count, len(data) // el, MAX_HEX_BYTES))
    return "{" + ",".join("0x%x" % int.from_bytes(data[i * el:(i + 1) * el], "little")
                          for i in range(count)) + "}"


def _bitmask(v: Any, elsize: int) -> str:
    """A bitmask as the kernel's %*pb: 32-bit hex words, most significant first."""
    data = _as_bytes(v, elsize)
    words = [int.from_bytes(data[i:i + 4].ljust(4, b"\0"), "little") for i in range(0, len(data), 4)]
    if not words:
        return ""
    words.reverse()
    first = "%x" % words[0]
    return ",".join([first] + ["%08x" % w for w in words[1:]])


def _mac(v: Any, elsize: int) -> str:
    data = _as_bytes(v, elsize)
    if len(data) < 6:
        return ""
    return ":".join("%02x" % b for b in data[:6])


def _ip4(v: Any, elsize: int) -> str:
    data = _as_bytes(v, elsize)
    if len(data) < 4:
        return ""
    return "%d.%d.%d.%d" % tuple(data[:4])


def _ip6(v: Any, elsize: int) -> str:
    data = _as_bytes(v, elsize)
    if len(data) < 16:
        return ""
    import ipaddress
    return str(ipaddress.IPv6Address(data[:16]))


def _uuid(v: Any, elsize: int) -> str:
    d = _as_bytes(v, elsize)
    if len(d) < 16:
        return ""
    h = d[:16].hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def _udiv(a: int, b: int) -> int:
    b &= M64
    return (a & M64) // b if b else 0


def _umod(a: int, b: int) -> int:
    b &= M64
    return (a & M64) % b if b else 0


def _cdiv(a: int, b: int) -> int:
    if not b:
        return 0
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _cmod(a: int, b: int) -> int:
    if not b:
        return 0
    return a - b * _cdiv(a, b)


def _num(v: Any) -> int:
    return v if isinstance(v, int) else 0


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return ""


# --------------------------------------------------------------------------- fields


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


# Payload readers used by generated code in payload mode. Each copes with a short or
# hostile payload by returning an empty value: a wrong length must not stop a report.

def _cstr(p: Any, off: int, size: int) -> str:
    b = bytes(p[off:off + size] if size else p[off:])
    i = b.find(b"\0")
    return (b if i < 0 else b[:i]).decode("utf-8", "replace")


def _loc(p: Any, off: int, rel: bool) -> tuple[int, int]:
    if off + 4 > len(p):
        return 0, 0
    v = int.from_bytes(p[off:off + 4], "little")
    start = v & 0xFFFF
    if rel:
        start += off + 4
    return start, v >> 16


def _dstr(p: Any, off: int, rel: bool) -> str:
    start, n = _loc(p, off, rel)
    if not n:
        return ""
    return _cstr(p, start, n)


def _ints(b: bytes, elsize: int, signed: bool) -> list:
    if elsize not in (1, 2, 4, 8):
        return list(b)
    code = {1: "b", 2: "h", 4: "i", 8: "q"}[elsize]
    code = code if signed else code.upper()
    n = len(b) // elsize
    return list(struct.unpack_from("<%d%s" % (n, code), b)) if n else []


def _darr(p: Any, off: int, rel: bool, elsize: int, signed: bool) -> list:
    start, n = _loc(p, off, rel)
    return _ints(bytes(p[start:start + n]), elsize, signed)


def _sarr(p: Any, off: int, size: int, elsize: int, signed: bool) -> list:
    return _ints(bytes(p[off:off + size] if size else p[off:]), elsize, signed)


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


# --------------------------------------------------------------------------- code generation


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


_HELPERS = {
    "_s": _s, "_width": _width, "_ptr": _ptr, "_alt_hex": _alt_hex, "_flags": _flags, "_symbolic": _symbolic,
    "_hex": _hex, "_array": _array, "_bitmask": _bitmask, "_mac": _mac, "_ip4": _ip4,
    "_ip6": _ip6, "_uuid": _uuid, "_cdiv": _cdiv, "_cmod": _cmod, "_udiv": _udiv, "_umod": _umod, "_num": _num,
    "_text": _text, "_cstr": _cstr, "_dstr": _dstr, "_darr": _darr, "_sarr": _sarr,
    "__builtins__": {"len": len, "chr": chr, "min": min, "max": max, "int": int},
}

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
