"""The C argument expressions of a print fmt, parsed the way libtraceevent parses them.

trace-cmd prints what libtraceevent's own (unusual) operator association evaluates to,
so this parser reproduces that association rather than C's: see :meth:`_Parser.expr`.
Its output is a tree of plain tuples that :mod:`.codegen` turns into Python. Every
recursion is counted against ``MAX_DEPTH`` because the text comes from the traced guest.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from vmtrace.errors import FormatError
from vmtrace.format.printfmt.limits import M64, MAX_DEPTH, MAX_LITERAL_DIGITS


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
