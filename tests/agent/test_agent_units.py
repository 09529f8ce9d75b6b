"""Agent pieces that need no tracefs: port discovery, placement policy, Python 3.9, CLI."""
from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from paths import ROOT
from vmtrace.agent import placement, ports
from vmtrace.format.stream import STREAM_MAGIC, unpack_stream
from vmtrace.errors import FormatError, VmtraceError
from vmtrace import protocol as P

AGENT_FILES = sorted((ROOT / "src/vmtrace/agent").glob("*.py")) + [
    ROOT / "src/vmtrace" / n for n in ("protocol.py", "tracefs.py", "errors.py", "__init__.py")]


def test_ports_found_through_sysfs_names_without_udev(tmp_path):
    """No virtio-serial here, so a fake /sys/class/virtio-ports tree stands in for it."""
    sysd, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    for vport, name in (("vport0p1", "agent-ctl-path"), ("vport0p2", "trace-path-cpu0")):
        (sysd / vport).mkdir(parents=True)
        (sysd / vport / "name").write_text(name + "\n")
        (dev / vport).write_text("")
    found = ports.locate(["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"],
                         dev_dir=str(tmp_path / "no-udev"), sys_dir=str(sysd), dev_root=str(dev))
    assert found["trace-path-cpu0"].path == str(dev / "vport0p2")
    assert found["agent-ctl-path"].kind == "virtio" and "trace-path-cpu1" not in found


def test_udev_link_wins_and_ports_dir_kinds(tmp_path):
    links = tmp_path / "virtio-ports"
    links.mkdir()
    (links / "trace-path-cpu0").write_text("")
    assert ports.locate(["trace-path-cpu0"], dev_dir=str(links), sys_dir=str(tmp_path / "x"))[
        "trace-path-cpu0"].path == str(links / "trace-path-cpu0")
    d = tmp_path / "ports"
    d.mkdir()
    os.mkfifo(d / "trace-path-cpu0")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "agent-ctl-path"))
    (d / "trace-path-cpu1").write_text("a plain file")
    found = ports.locate(["trace-path-cpu0", "agent-ctl-path"], str(d))
    assert (found["trace-path-cpu0"].kind, found["agent-ctl-path"].kind) == ("fifo", "socket")
    with pytest.raises(VmtraceError, match="neither a FIFO"):
        ports.locate(["trace-path-cpu1"], str(d))
    s.close()


def test_open_fifo_port_waits_for_a_reader_but_gives_up_on_stop(tmp_path):
    fifo = tmp_path / "trace-path-cpu0"
    os.mkfifo(fifo)
    spec = ports.PortSpec("trace-path-cpu0", str(fifo), "fifo")
    calls = []
    assert ports.open_port(spec, True, lambda: calls.append(1) or len(calls) > 2, wait_note=False) is None
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fd = ports.open_port(spec, True, lambda: True)
    assert fd is not None
    os.close(fd)
    os.close(r)


def test_placement_prefers_least_busy_housekeeping_cpus():
    before = {0: (0, 0), 1: (0, 0), 2: (0, 0)}
    after = {0: (95, 100), 1: (5, 100), 2: (12, 100)}
    busy = placement.busy_fraction(before, after)
    assert placement.least_busy(busy, [0, 1, 2]) == [1, 2]
    assert placement.least_busy(busy, [0]) == [0]
    assert placement.parse_mode("auto", [0, 1]) == "auto"
    assert placement.parse_mode("percpu", [0, 1]) == "percpu"
    assert placement.parse_mode("1", [0, 1]) == [1]
    with pytest.raises(VmtraceError, match="CPU 5 not online"):
        placement.parse_mode("0,5", [0, 1])
    with pytest.raises(VmtraceError):
        placement.parse_mode("x", [0, 1])
    assert placement.cpu_times()  # this machine's /proc/stat parses


def test_unpack_stream_rejects_bad_input_with_file_and_offset(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a stream")
    with pytest.raises(FormatError, match="bad magic"):
        unpack_stream(str(bad), str(tmp_path / "o1"))
    good = STREAM_MAGIC + P.encode(P.pack_files({"header_page": b"x"}))
    evil = P.header(P.PAGES, {"cpu": -1}, 0)
    (tmp_path / "s2").write_bytes(good + evil)
    with pytest.raises(FormatError, match=r"s2: offset \d+: pages frame with bad cpu"):
        unpack_stream(str(tmp_path / "s2"), str(tmp_path / "o2"))
    trav = STREAM_MAGIC + P.encode(P.Message(P.METADATA, {"files": [["../../x", 1]]}, b"x"))
    (tmp_path / "s3").write_bytes(trav)
    with pytest.raises(FormatError, match="not allowed"):
        unpack_stream(str(tmp_path / "s3"), str(tmp_path / "o3"))
    (tmp_path / "s4").write_bytes(good + P.header(P.PAGES, {"cpu": 0}, 8192) + b"\0" * 100)
    with pytest.raises(FormatError, match="truncated pages frame"):
        unpack_stream(str(tmp_path / "s4"), str(tmp_path / "o4"))
    (tmp_path / "s6").write_bytes(good + P.header(P.PAGES, {"cpu": 1}, 4) + b"abcd")
    summary = unpack_stream(str(tmp_path / "s6"), str(tmp_path / "o6"))
    assert summary == {"complete": False, "cpus": {1: 4}, "frames": 2}
    assert (tmp_path / "o6" / "cpu1").read_bytes() == b"abcd"
    assert (tmp_path / "o6" / "metadata" / "header_page").read_bytes() == b"x"


def test_agent_sources_are_python39_syntax_and_import_no_third_party():
    allowed_roots = set(sys.stdlib_module_names) | {"vmtrace"}
    for path in AGENT_FILES:
        tree = ast.parse(path.read_text(), str(path), feature_version=(3, 9))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed_roots, (path, roots)
            if "vmtrace" in roots and isinstance(node, ast.ImportFrom) and node in tree.body:
                assert node.module.split(".")[1:2] in ([], ["agent"], ["protocol"], ["tracefs"], ["errors"]), \
                    (path, node.module)


def test_agent_modules_import_and_parse_args_under_python39():
    py39 = Path("/root/.pyenv/versions/3.9.18/bin/python3.9")
    if not py39.exists():
        pytest.skip("no Python 3.9 interpreter here; the syntax check above still ran")
    code = ("import vmtrace.agent.core, vmtrace.agent.__main__ as m, vmtrace.agent.splice as s;"
            "print(s.IMPLEMENTATION)")
    r = subprocess.run([str(py39), "-I", "-c", "import sys; sys.path.insert(0, %r); %s" % (str(ROOT / "src"), code)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ctypes"  # 3.9 has no os.splice


def test_click_command_passes_everything_through():
    r = subprocess.run([str(ROOT / ".venv/bin/vmtrace"), "agent", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--pump-cpus" in r.stdout and "--output-dir" in r.stdout
    r = subprocess.run([str(ROOT / ".venv/bin/vmtrace"), "agent", "-s", "9"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "64K and 1M" in r.stderr
