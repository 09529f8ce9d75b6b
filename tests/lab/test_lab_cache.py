"""The lab's image cache under concurrent use: pruning never removes an image that a
living process got from build_image(), and images appear only when complete."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmtrace.lab import image


def _fake_image(root: Path, name: str, used_ago: float) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / image.INITRD).write_bytes(b"070701" + name.encode())
    (d / "manifest.json").write_text(json.dumps({"key": name, "kernel": "/boot/x", "initrd": image.INITRD}))
    image.touch_used(d)
    t = time.time() - used_ago
    os.utime(d / ".used", (t, t))
    return d


_HOLDER = """
import sys
from pathlib import Path
from vmtrace.lab import image
image._hold(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def _holder(d: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_prune_keeps_the_newest_and_what_another_process_holds(tmp_path):
    old = image.PRUNE_GRACE + 3600
    keep = _fake_image(tmp_path, "new", 0)
    recent = [_fake_image(tmp_path, f"r{i}", old + i) for i in range(2)]
    held = _fake_image(tmp_path, "held", old + 100)
    stale = _fake_image(tmp_path, "stale", old + 200)
    p = _holder(held)
    t = time.time() - old - 100
    os.utime(held / ".used", (t, t))            # held, but by use time the oldest but one
    try:
        image._prune(tmp_path, keep=keep)
        assert keep.is_dir() and all(d.is_dir() for d in recent)
        assert held.is_dir() and (held / image.INITRD).is_file()   # in use elsewhere
        assert not stale.exists()                                   # nobody's, old: gone
    finally:
        p.stdin.close()
        p.wait(30)
    image._prune(tmp_path, keep=keep)           # its process ended: now it may go
    assert not held.exists()
    assert not [d for d in tmp_path.iterdir() if d.name.startswith(".trash-")]


def test_prune_spares_images_used_recently_even_unheld(tmp_path):
    keep = _fake_image(tmp_path, "new", 0)
    others = [_fake_image(tmp_path, f"o{i}", 60 * (i + 1)) for i in range(5)]
    image._prune(tmp_path, keep=keep)
    assert all(d.is_dir() for d in others)      # all used within PRUNE_GRACE


def test_prune_spares_images_this_process_holds(tmp_path):
    keep = _fake_image(tmp_path, "new", 0)
    mine = _fake_image(tmp_path, "mine", 0)
    others = [_fake_image(tmp_path, f"o{i}", 10) for i in range(3)]
    image._hold(mine)
    try:
        for d in [mine] + others:
            t = time.time() - image.PRUNE_GRACE - 60
            os.utime(d / ".used", (t, t))
        image._prune(tmp_path, keep=keep, max_images=1)
        assert mine.is_dir()
        assert not any(d.exists() for d in others)
    finally:
        os.close(image._HELD.pop(str(mine)))


def test_prune_removes_builds_killed_long_ago_only(tmp_path):
    keep = _fake_image(tmp_path, "new", 0)
    dead = tmp_path / "build-dead"
    live = tmp_path / "build-live"
    for d in (dead, live):
        (d / "image").mkdir(parents=True)
    t = time.time() - image.STALE_BUILD - 60
    os.utime(dead, (t, t))
    image._prune(tmp_path, keep=keep)
    assert not dead.exists() and live.is_dir()


def test_forced_rebuild_replaces_files_under_a_reader(tmp_path):
    final = _fake_image(tmp_path, "img", 0)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / image.INITRD).write_bytes(b"070701 rebuilt")
    (stage / "manifest.json").write_text(json.dumps({"key": "img", "kernel": "/boot/x"}))
    with open(final / image.INITRD, "rb") as reader:
        image._install(stage, final)
        assert reader.read() == b"070701img"          # a boot that had opened it is fine
    assert (final / image.INITRD).read_bytes() == b"070701 rebuilt"
    assert (final / ".used").exists()                   # the directory itself stayed


def test_new_image_appears_whole_and_a_half_one_is_replaced(tmp_path):
    half = tmp_path / "img"
    half.mkdir()
    (half / image.INITRD).write_bytes(b"partial")      # no manifest: never complete
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / image.INITRD).write_bytes(b"070701 whole")
    (stage / "manifest.json").write_text("{}")
    image._install(stage, half)
    assert (half / image.INITRD).read_bytes() == b"070701 whole" and not stage.exists()


def test_a_vanished_image_is_one_clear_error(tmp_path):
    from vmtrace.errors import VmtraceError
    from vmtrace.lab.qemu import make_initrd
    d = _fake_image(tmp_path, "gone", 0)
    img = image._load(d)
    (d / image.INITRD).unlink()
    with pytest.raises(VmtraceError, match="gone from the cache"):
        make_initrd(img, tmp_path / "out.img", "true")


def test_old_manifests_still_name_their_gzip_initrd(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"key": "k", "kernel": "/boot/x"}))
    assert image._load(d).initrd == d / "initrd.gz"
