"""Fuzzing the protocol decoder, the recorder's first contact with a hostile guest.

Coverage-guided with atheris (tests/support/fuzz_protocol.py, a short deterministic budget here;
the file's docstring says how to hunt longer) when atheris is installed, and always a
hypothesis property over structured streams: valid frames, frames with absurd numbers,
garbage and oversized headers, cut into feeds at random places.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fuzz_protocol
from paths import SUPPORT
from vmtrace import protocol as P



def test_atheris_short_deterministic_run(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(fuzz_protocol.seeds()):
        (corpus / ("seed%d" % i)).write_bytes(seed)
    res = subprocess.run([sys.executable, str(SUPPORT / "fuzz_protocol.py"), "-runs=30000", "-seed=1",
                          "-artifact_prefix=%s/" % tmp_path, str(corpus)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Done 30000 runs" in res.stderr


_field = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.booleans(), st.none(),
                   st.text(max_size=20), st.floats(allow_nan=True, allow_infinity=True),
                   st.lists(st.integers(0, 2 ** 65), max_size=4))


def _frame(fields, blob, mtype):
    import json

    body = json.dumps(fields).encode()
    return P.HEADER.pack(P.MAGIC, P.VERSION, mtype, 0, len(body), len(blob)) + body + blob


_piece = st.one_of(
    st.builds(_frame, st.dictionaries(st.sampled_from(["id", "seq", "guest_ns", "cpus", "x"]), _field, max_size=4),
              st.binary(max_size=64), st.sampled_from(sorted(P.NAMES) + [0, 99])),
    st.binary(max_size=40),
    st.builds(lambda j, b: P.HEADER.pack(P.MAGIC, P.VERSION, P.OK, 0, j, b), st.integers(0, 2 ** 32 - 1),
              st.integers(0, 2 ** 32 - 1)),
    st.just(P.MAGIC))


@settings(max_examples=300, deadline=None)
@given(st.lists(_piece, max_size=12), st.lists(st.integers(0, 4000), max_size=6),
       st.integers(16, 300), st.booleans())
def test_frames_decode_the_same_however_the_stream_is_cut(pieces, cuts, max_json, keep):
    data = b"".join(pieces)
    keep_mod = 2 if keep else 0
    whole = fuzz_protocol._run(data, [], False, max_json, keep_mod)
    split = fuzz_protocol._run(data, sorted(c % (len(data) + 1) for c in cuts), False, max_json, keep_mod)
    assert whole == split
    for m in whole:
        for v in m.fields.values():
            if type(v) is int:
                assert P.INT_MIN <= v <= P.INT_MAX
            if isinstance(v, float):
                assert v == v and abs(v) != float("inf")
