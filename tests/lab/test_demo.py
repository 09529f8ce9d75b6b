"""`vmtrace demo` as a user runs it (a subprocess), and its one-line refusals."""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib

import pytest

from vmtrace.cli import main as cli_main
from vmtrace.lab.demo import MARKER, _claim_outdir, parse_scores, SCORE
from vmtrace.errors import VmtraceError

VMTRACE = os.path.join(os.path.dirname(sys.executable), "vmtrace")


def _png_size_and_colours(path: str) -> tuple[int, int, int]:
    """Width, height and number of distinct pixel values, read with matplotlib."""
    import matplotlib.image as mpimg
    import numpy as np

    with open(path, "rb") as f:
        head = f.read(33)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    assert zlib.crc32(head[12:29]) == struct.unpack(">I", head[29:33])[0]
    img = mpimg.imread(path)
    colours = len(np.unique(img.reshape(-1, img.shape[-1]), axis=0))
    return w, h, colours


@pytest.mark.vm
@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_writes_a_trace_a_timeline_and_says_where(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([VMTRACE, "demo", "--seconds", "2", "-o", str(out), "--accel", "tcg"],
                         capture_output=True, text=True, timeout=360)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    text = run.stdout
    dat, png, html = out / "demo.dat", out / "timeline.png", out / "timeline.html"
    for f in (dat, png, html, out / "session.json", out / MARKER):
        assert f.is_file() and f.stat().st_size > 0, f
        assert str(f) in text or f.name == MARKER, "the summary does not name %s" % f
    assert "trace-cmd report -i" in text and "kernelshark" in text
    assert re.search(r"sched:sched_switch\s+│\s+[\d,]+", text)          # the summary table
    assert "cpus=2" in text                                          # the first report lines

    rep = subprocess.run(["trace-cmd", "report", "-i", str(dat)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-500:]
    assert rep.stdout.startswith("cpus=2\n")
    assert re.search(r"pingpong-\d+\s+\[000\]", rep.stdout)
    assert "sched_switch:" in rep.stdout and "DROPPED" not in rep.stdout

    w, h, colours = _png_size_and_colours(str(png))
    assert w >= 600 and h >= 150 and colours > 8, (w, h, colours)
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "pingpong" in page


def test_bad_input_is_one_line(capsys, tmp_path):
    assert cli_main(["demo", "--seconds", "0", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vmtrace: error: --seconds must be between 0 and 600"]
    assert cli_main(["demo", "--host-events", ",", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vmtrace: error: --host-events needs a list such as sched,kvm"]


def test_outdir_replaces_a_previous_demo_but_not_another_recording(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("demo.dat", "timeline.png", "session.json", MARKER, "notes.txt"):
        (mine / name).write_text("x")
    assert _claim_outdir(str(mine)) == str(mine)
    assert sorted(os.listdir(mine)) == ["notes.txt"]       # only what a demo writes is removed
    other = tmp_path / "other"
    other.mkdir()
    (other / "guest1.dat").write_text("x")
    with pytest.raises(VmtraceError, match="did not make"):
        _claim_outdir(str(other))
    assert (other / "guest1.dat").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(VmtraceError, match="not a directory"):
        _claim_outdir(str(tmp_path / "file"))


def test_scores_are_read_from_the_console():
    lines = ["noise", f"{SCORE} pingpong 8383.2 intloop 14949.5", f"{SCORE} stall pingpong 12.5",
             f"{SCORE} broken pingpong x"]
    assert parse_scores(lines) == {"": {"pingpong": 8383.2, "intloop": 14949.5},
                                   "stall": {"pingpong": 12.5}, "broken": {}}
