"""Transports are found by name: a new one is picked up by `prepare`, the layout and the CLI."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from paths import SUPPORT
from vmtrace.errors import VmtraceError
from vmtrace.host.layout import GuestLayout, prepare
from vmtrace.host.transport import TRANSPORTS, get_transport, transport_names



@pytest.fixture
def toy(monkeypatch):
    import toy_transport

    monkeypatch.setitem(TRANSPORTS, "toy", toy_transport.ToyTransport)
    return toy_transport.ToyTransport


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`vmtrace ...` in a fresh process that has imported the toy transport first."""
    code = "import sys, toy_transport\nfrom vmtrace.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SUPPORT)] + sys.path))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def test_the_cli_prepares_a_registered_transport(tmp_path):
    out = _cli("prepare", "vm1", "--cpus", "2", "--dir", str(tmp_path), "--transport", "toy")
    assert out.returncode == 0, out.stderr
    assert "file,id=vmtvm11,path=%s.toy" % (tmp_path / "vm1" / "agent-ctl-path") in out.stdout
    assert "name=trace-path-cpu1" in out.stdout
    assert sorted(os.listdir(tmp_path / "vm1")) == ["agent-ctl-path.toy", "trace-path-cpu0.toy",
                                                    "trace-path-cpu1.toy"]
    for f in (tmp_path / "vm1").iterdir():
        assert stat.S_ISREG(os.lstat(f).st_mode) and stat.S_IMODE(os.lstat(f).st_mode) == 0o660
    out = _cli("prepare", "vm1", "--cpus", "2", "--dir", str(tmp_path), "--transport", "toy", "--libvirt")
    assert out.returncode == 0 and out.stdout.startswith("<channel type='file'>")
    assert "[fifo|socket|toy]" in _cli("prepare", "--help").stdout


def test_the_layout_recognises_and_replaces_a_registered_transport(tmp_path, toy):
    lay = prepare("vm1", 3, str(tmp_path), transport="toy")
    assert isinstance(lay.backend, toy)
    again = GuestLayout.open("vm1", str(tmp_path))
    assert (again.cpus, again.transport) == (3, "toy")
    assert again.files() == lay.files()
    lay = prepare("vm1", 2, str(tmp_path), transport="fifo")
    assert sorted(os.listdir(tmp_path / "vm1")) == sorted(os.path.basename(f) for f in lay.files())
    prepare("vm1", 1, str(tmp_path), transport="toy")
    assert sorted(os.listdir(tmp_path / "vm1")) == ["agent-ctl-path.toy", "trace-path-cpu0.toy"]


def test_a_registered_transport_gets_the_same_checks(tmp_path, toy):
    prepare("vm1", 2, str(tmp_path), transport="toy")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    node = tmp_path / "vm1" / "trace-path-cpu1.toy"
    node.unlink()
    os.symlink(victim, node)
    with pytest.raises(VmtraceError, match="symlink"):
        GuestLayout.open("vm1", str(tmp_path))
    with pytest.raises(VmtraceError, match="symlink"):
        prepare("vm1", 2, str(tmp_path), transport="toy")
    with pytest.raises(VmtraceError, match="symlink"):
        prepare("vm1", 1, str(tmp_path), transport="fifo")  # a stale node is checked before removal
    assert victim.read_text() == "keep me"
    node.unlink()
    prepare("vm1", 2, str(tmp_path), transport="toy")
    node.unlink()
    os.mkfifo(node)
    with pytest.raises(VmtraceError, match="trace-path-cpu1.toy is not a toy file"):
        GuestLayout.open("vm1", str(tmp_path))
    os.mkfifo(tmp_path / "vm1" / "trace-path-cpu0.in")
    with pytest.raises(VmtraceError, match="mixes FIFOs and toy files"):
        GuestLayout.open("vm1", str(tmp_path))


def test_unknown_transport_names_the_known_ones(toy):
    with pytest.raises(VmtraceError, match=r"bad transport 'vsock' \(use fifo, socket or toy\)"):
        get_transport("vsock")


def test_suffixes_say_which_transport_a_node_belongs_to(toy):
    seen = {}
    for name in transport_names():
        t = get_transport(name)
        assert t.name == name
        for suffix in t.suffixes:
            assert suffix not in seen and not suffix[:1].isdigit(), (name, suffix, seen.get(suffix))
            seen[suffix] = name
