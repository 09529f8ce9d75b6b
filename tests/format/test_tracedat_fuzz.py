"""Hostile trace.dat files: every corruption is one FormatError, never a crash or a hang.

Starts from the small real fixtures (tests/data/tracedat_small_v{6,7}.dat) and
truncates them everywhere, flips bytes with hypothesis (bounded example counts so this
stays fast), and builds the classic attacks by hand: an options chain that loops,
offsets past the end, absurd counts and sizes, and compressed blocks that expand past
what they declare (decompression bombs).
"""
from __future__ import annotations

import struct
import tempfile
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from paths import DATA
from vmtrace.errors import FormatError
from vmtrace.format.compress import MAX_BLOCK, get_codec
from vmtrace.format.tracedat_read import open_tracedat
from vmtrace.format.rawdir import _gunzip_capped

V7 = (DATA / "tracedat_small_v7.dat").read_bytes()
V6 = (DATA / "tracedat_small_v6.dat").read_bytes()


def consume(blob: bytes) -> str:
    """Open and read everything; 'ok' or 'error'. Anything else escaping fails the test."""
    with tempfile.NamedTemporaryFile(suffix=".dat") as f:
        f.write(blob)
        f.flush()
        try:
            with open_tracedat(f.name) as src:
                for b in src.buffers:
                    for c in b.cpus:
                        for page in c.pages():
                            assert len(page) == src.page_size
                return "ok"
        except FormatError as e:
            text = str(e)
            assert "\n" not in text and f.name in text
            return "error"


def test_fixtures_are_sound():
    assert consume(V7) == "ok" and consume(V6) == "ok"


@pytest.mark.parametrize("blob", [V7, V6], ids=["v7", "v6"])
def test_truncated_anywhere(blob):
    cuts = set(range(0, 80)) | set(range(0, len(blob), max(1, len(blob) // 300)))
    results = {cut: consume(blob[:cut]) for cut in sorted(cuts)}
    # A cut inside the headers always fails; a cut inside CPU data must be noticed too.
    assert all(r == "error" for cut, r in results.items() if cut < 200)
    assert results[max(cuts)] in ("ok", "error")


def _mutations(blob: bytes):
    return st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)),
                    min_size=1, max_size=8)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=_mutations(V7))
def test_v7_byte_flips(edits):
    b = bytearray(V7)
    for pos, val in edits:
        b[pos] = val
    consume(bytes(b))


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=_mutations(V6[:8192]))
def test_v6_header_byte_flips(edits):
    b = bytearray(V6)
    for pos, val in edits:
        b[pos] = val
    consume(bytes(b))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(0, len(V7) - 8), val=st.sampled_from(
    [0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 40, len(V7), len(V7) - 1]),
    width=st.sampled_from([4, 8]))
def test_v7_absurd_numbers(pos, val, width):
    b = bytearray(V7)
    b[pos:pos + width] = struct.pack("<Q" if width == 8 else "<I", val & ((1 << 8 * width) - 1))
    consume(bytes(b))


# ---------------------------------------------------------------- hand-made attacks

def _v7_layout(blob: bytes) -> dict:
    """Offsets of the structures the attacks patch, found by walking the file."""
    pos = 14 + 4
    for _ in range(2):
        pos = blob.index(b"\0", pos) + 1
    first = struct.unpack_from("<Q", blob, pos)[0]
    out = {"options_ptr": pos, "first_options": first, "sections": {}}
    p = 18
    p = blob.index(b"\0", blob.index(b"\0", p) + 1) + 1 + 8
    while p + 16 <= len(blob):
        sid, flags, _, size = struct.unpack_from("<HHIQ", blob, p)
        out["sections"].setdefault(sid, []).append((p, flags, size))
        p += 16 + size
    opt = first + 16
    while True:
        oid, size = struct.unpack_from("<HI", blob, opt)
        if oid == 0:
            out["done_next"] = opt + 6
            break
        opt += 6 + size
    return out


def _expect(blob: bytes, words: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=".dat") as f:
        f.write(blob)
        f.flush()
        with pytest.raises(FormatError, match=words):
            with open_tracedat(f.name) as src:
                for b in src.buffers:
                    for c in b.cpus:
                        for _ in c.pages():
                            pass


def test_options_chain_loop():
    lay = _v7_layout(V7)
    b = bytearray(V7)
    struct.pack_into("<Q", b, lay["done_next"], lay["first_options"])
    _expect(bytes(b), "loop")


def test_offsets_past_the_end():
    lay = _v7_layout(V7)
    b = bytearray(V7)
    struct.pack_into("<Q", b, lay["options_ptr"], len(V7) + 4096)
    _expect(bytes(b), "past the end")


def test_section_size_past_the_end():
    lay = _v7_layout(V7)
    p, _, _ = lay["sections"][16][0]
    b = bytearray(V7)
    struct.pack_into("<Q", b, p + 8, 1 << 60)
    _expect(bytes(b), "claims")


def test_decompression_bomb_in_a_section():
    """kallsyms-like section: 8 MB of zeros compress to a few hundred bytes; declaring a
    small uncompressed size must stop decoding there, and a huge one is refused."""
    lay = _v7_layout(V7)
    p, flags, size = lay["sections"][18][0]          # events format section
    assert flags & 1
    codec = get_codec("zstd")
    bomb = codec.compress(bytes(8 << 20))
    for declared, words in ((1000, "expands past"), (MAX_BLOCK + 1, "limit is")):
        body = struct.pack("<II", len(bomb), declared) + bomb
        b = V7[:p] + struct.pack("<HHIQ", 18, 1, 0, len(body)) + body
        # keep the rest of the file where it was, so other offsets stay valid
        b = b + V7[len(b):] if len(b) < len(V7) else b
        _expect(b, words)


def test_chunk_bomb_in_cpu_data():
    lay = _v7_layout(V7)
    p, _, _ = lay["sections"][3][-1]                 # the buffer section with data
    b = bytearray(V7)
    # first chunk header: after section header, page-aligned data start, 4-byte count
    data = (p + 16 + 4095) & ~4095
    zsize, usize = struct.unpack_from("<II", b, data + 4)
    assert 0 < usize <= 10 * 4096 and zsize < len(V7)
    struct.pack_into("<I", b, data + 8, usize // 2)
    _expect(bytes(b), "expands past")
    struct.pack_into("<I", b, data + 8, 0xFFFFFFFF)
    _expect(bytes(b), "limit is")


def test_codecs_refuse_lies_about_size():
    for name in ("zstd", "zlib"):
        c = get_codec(name)
        z = c.compress(b"a" * 10000)
        assert c.decompress(z, 10000) == b"a" * 10000
        with pytest.raises(FormatError, match="expands past"):
            c.decompress(z, 9999)
        with pytest.raises(FormatError, match="decompressed to 10000 bytes, header says 10001"):
            c.decompress(z, 10001)
        with pytest.raises(FormatError, match="corrupt"):
            c.decompress(b"\x28\xb5\x2f\xfd garbage" if name == "zstd" else b"x\x9cgarbage", 10)
    # a zstd frame that *claims* a huge content size is not believed
    import zstandard
    framed = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 100000)
    with pytest.raises(FormatError, match="expands past"):
        get_codec("zstd").decompress(framed, 100)


def test_gzip_bomb_is_capped():
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = gz.compress(bytes(4 << 20)) + gz.flush()
    with pytest.raises(FormatError, match="expands past"):
        _gunzip_capped(bomb, 1 << 20, "kallsyms.gz")
    assert len(_gunzip_capped(bomb, 8 << 20, "kallsyms.gz")) == 4 << 20
