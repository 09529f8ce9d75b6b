"""Compiling the reference C peers into a cache, without touching their sources."""
import shutil
import subprocess

import pytest

from vmtrace.bench import peers
from vmtrace.errors import VmtraceError

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _src_dir():
    try:
        return peers.source_dir()
    except VmtraceError as exc:
        pytest.skip(str(exc))


@needs_gcc
def test_build_compiles_once_and_reuses(tmp_path):
    src = _src_dir()
    exe = peers.build("intloop", src, tmp_path)
    assert exe.parent == tmp_path
    out = subprocess.run([str(exe), "0.05"], capture_output=True, text=True, check=True).stdout
    assert float(out) > 0
    mtime = exe.stat().st_mtime_ns
    assert peers.build("intloop", src, tmp_path) == exe
    assert exe.stat().st_mtime_ns == mtime


@needs_gcc
def test_changed_source_gets_a_new_binary(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(_src_dir(), src)
    first = peers.build("pingpong", src, tmp_path / "cache")
    (src / "pingpong.c").write_text((src / "pingpong.c").read_text() + "\n/* changed */\n")
    second = peers.build("pingpong", src, tmp_path / "cache")
    assert first != second and first.exists() and second.exists()


@needs_gcc
def test_compile_error_is_one_line(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(_src_dir(), src)
    (src / "intloop.c").write_text("this is not C\n")
    with pytest.raises(VmtraceError, match="compiling .*intloop.c failed"):
        peers.build("intloop", src, tmp_path / "cache")


def test_unknown_peer():
    with pytest.raises(VmtraceError, match="unknown reference peer"):
        peers.build("nope")


def test_missing_sources_name_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(peers.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(peers, "_candidates", lambda: [tmp_path])
    with pytest.raises(VmtraceError, match=peers.ENV_DIR):
        peers.source_dir()
