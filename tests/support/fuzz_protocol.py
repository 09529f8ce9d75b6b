"""Coverage-guided fuzzing of the control protocol's decoder with atheris (libFuzzer).

    python tests/support/fuzz_protocol.py -runs=20000 -seed=1            # what the suite runs
    python tests/support/fuzz_protocol.py -max_total_time=3600 CORPUS/   # a longer hunt

The first bytes choose the decoder's settings (orders allowed, a small JSON limit,
which blobs to keep) and where the input is cut into feeds; the rest is the stream.
Every run checks what the decoder promises to a receiver facing a hostile peer: it
never raises, it yields only messages, orders and ProtocolErrors, what it holds stays
under its bound, and (frames only) cutting the stream differently does not change the
messages; how garbage is cut into error reports may differ, by design. Any violation raises, which libFuzzer reports with the input.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from vmtrace import protocol as P


def _run(data: bytes, cuts: list, allow_orders: bool, max_json: int, keep_mod: int):
    keep = (lambda t, f, n: (n + t) % keep_mod != 0) if keep_mod else None
    dec = P.Decoder(allow_orders=allow_orders, max_json=max_json, max_blob=4096, keep_blob=keep)
    items = []
    prev = 0
    bound = P.HEADER_SIZE + max_json + 4096
    for cut in cuts + [len(data)]:
        chunk = data[prev:cut]
        prev = max(prev, cut)
        for item in dec.feed(chunk):
            if not isinstance(item, (P.Message, P.Order, P.ProtocolError)):
                raise AssertionError("decoder yielded %r" % (item,))
            items.append(item)
        if dec.pending > bound + len(chunk):
            raise AssertionError("decoder holds %d bytes (bound %d)" % (dec.pending, bound + len(chunk)))
    return [i for i in items if not isinstance(i, P.ProtocolError)]


def test_one_input(raw: bytes) -> None:
    if len(raw) < 4:
        return
    flags, n_cuts, max_json, keep_mod = raw[0], raw[1] % 8, 16 + raw[2] * 64, raw[3] % 4
    data = raw[4:]
    cuts = sorted((raw[4 + i] * 37) % (len(data) + 1) for i in range(min(n_cuts, len(data))))
    orders = bool(flags & 1)
    whole = _run(data, [], orders, max_json, keep_mod)
    split = _run(data, cuts, orders, max_json, keep_mod)
    # A lone "1" at the end of a feed is a complete seed order (docs/protocol.md), so
    # with orders allowed the cuts may differ; frames never depend on them.
    if whole != split and not orders:
        raise AssertionError("cutting the stream changed what it decodes to: %r vs %r" % (whole, split))
    try:
        P.loads(data)
    except P.ProtocolError:
        pass


def seeds() -> list:
    """Inputs that start the search inside the format: 4 setting bytes, then frames."""
    head = bytes([0, 3, 8, 1])
    frames = [P.encode(P.msg("hello", id=1, cpus=[0, 1], clock="mono")),
              P.encode(P.msg("ok", blob=b"abc", id=2)),
              P.encode(P.pack_files({"header_page": b"x", "events/a/b/format": b"y"}, id=3)),
              P.HEADER.pack(P.MAGIC, P.VERSION, P.STATS, 0, 3, 0) + b'{"a',
              P.MAGIC + b"\x01\x09" + b"x" * 10, b'1\n0\n']
    return [head + f for f in frames] + [head + b"".join(frames)]


def main() -> None:
    atheris.Setup(sys.argv + ["-max_len=4096"], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
