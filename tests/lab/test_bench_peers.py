"""vmtrace's own C peers: shipped in the package, compiled into a cache, and doing what
the benchmarks and the lab guest rely on (a score on stdout; pages moved from tracefs)."""
import os
import shutil
import signal
import subprocess
import time

import pytest

from vmtrace.lab import peers
from vmtrace.errors import VmtraceError
from vmtrace.tracefs import Tracefs

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def test_sources_ship_with_the_package(monkeypatch):
    monkeypatch.delenv(peers.ENV_DIR, raising=False)
    src = peers.source_dir()
    assert src == peers.PACKAGED
    assert src.is_relative_to(os.path.dirname(peers.__file__))
    for name, (file, _) in peers.PEERS.items():
        assert (src / file).stat().st_size > 500, name


@needs_gcc
@pytest.mark.parametrize("name", sorted(peers.PEERS))
def test_every_peer_compiles_without_warnings(tmp_path, name):
    file, flags = peers.PEERS[name]
    res = subprocess.run(["gcc", *flags, "-Wall", "-Wextra", "-Werror", "-o", str(tmp_path / name),
                          str(peers.source_dir() / file)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@needs_gcc
@pytest.mark.parametrize("name", ["intloop", "pingpong"])
def test_workloads_print_one_positive_score(tmp_path, name):
    exe = peers.build(name, out_dir=tmp_path)
    out = subprocess.run([str(exe), "0.2"], capture_output=True, text=True, check=True, timeout=30).stdout
    assert len(out.splitlines()) == 1 and float(out) > 0
    bad = subprocess.run([str(exe), "0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "positive" in bad.stderr


@needs_gcc
@pytest.mark.tracefs
def test_seedlike_agent_moves_whole_pages_and_stops_on_sigint(tmp_path):
    """The reference collector on a real tracefs instance: it drains what a workload made,
    in whole 4 KiB pages, and ends cleanly on SIGINT as the benchmarks stop it."""
    exe = peers.build("seedlike-agent", out_dir=tmp_path / "bin")
    ping = peers.build("pingpong", out_dir=tmp_path / "bin")
    tf = Tracefs.create_instance("vmtrace-test-seedlike-%d" % os.getpid(), exist_ok=False)
    out = tmp_path / "out"
    out.mkdir()
    try:
        tf.buffer_size_kb = 1024
        tf.enable_events(["sched"])
        tf.tracing_on = True
        agent = subprocess.Popen([str(exe), tf.path, str(out), str(os.cpu_count())])
        subprocess.run(["taskset", "-c", "0", str(ping), "0.5"], check=True, capture_output=True, timeout=60)
        time.sleep(0.3)          # longer than the agent's 100 ms idle sleep
        agent.send_signal(signal.SIGINT)
        assert agent.wait(timeout=10) == 0
    finally:
        tf.remove()
    sizes = [(out / ("cpu%d" % c)).stat().st_size for c in range(os.cpu_count())]
    assert all(s % 4096 == 0 for s in sizes), sizes
    assert sum(sizes) >= 4096 * 16, sizes    # 0.5 s of pingpong makes far more than 16 pages


@needs_gcc
def test_build_compiles_once_and_reuses(tmp_path):
    exe = peers.build("intloop", out_dir=tmp_path)
    assert exe.parent == tmp_path
    mtime = exe.stat().st_mtime_ns
    assert peers.build("intloop", out_dir=tmp_path) == exe
    assert exe.stat().st_mtime_ns == mtime


@needs_gcc
def test_changed_source_gets_a_new_binary(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(peers.source_dir(), src)
    first = peers.build("pingpong", src, tmp_path / "cache")
    (src / "pingpong.c").write_text((src / "pingpong.c").read_text() + "\n/* changed */\n")
    second = peers.build("pingpong", src, tmp_path / "cache")
    assert first != second and first.exists() and second.exists()


@needs_gcc
def test_compile_error_is_one_line(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(peers.source_dir(), src)
    (src / "intloop.c").write_text("this is not C\n")
    with pytest.raises(VmtraceError, match="compiling .*intloop.c failed"):
        peers.build("intloop", src, tmp_path / "cache")


def test_unknown_peer():
    with pytest.raises(VmtraceError, match="unknown reference peer"):
        peers.build("nope")


def test_override_directory_is_checked_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv(peers.ENV_DIR, str(tmp_path))
    with pytest.raises(VmtraceError, match=peers.ENV_DIR):
        peers.source_dir()
    shutil.copytree(peers.PACKAGED, tmp_path / "other")
    monkeypatch.setenv(peers.ENV_DIR, str(tmp_path / "other"))
    assert peers.source_dir() == tmp_path / "other"
