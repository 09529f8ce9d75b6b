"""`vmtrace prepare`: real directories, FIFOs and sockets; modes, groups, refusals."""
from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from vmtrace.errors import VmtraceError
from vmtrace.host.layout import GuestLayout, prepare, qemu_group

NOBODY = 65534


def test_fifo_layout_modes_and_group(tmp_path):
    lay = prepare("vm1", 3, str(tmp_path))
    d = tmp_path / "vm1"
    st = os.lstat(d)
    assert stat.S_IMODE(st.st_mode) == 0o710 and st.st_uid == os.geteuid()
    name, gid = qemu_group(None)
    assert st.st_gid == gid and lay.group == name
    want = {"agent-ctl-path.in", "agent-ctl-path.out"} | {"trace-path-cpu%d.%s" % (c, s) for c in range(3)
                                                          for s in ("in", "out")}
    assert set(os.listdir(d)) == want
    for f in want:
        fst = os.lstat(d / f)
        assert stat.S_ISFIFO(fst.st_mode) and stat.S_IMODE(fst.st_mode) == 0o660 and fst.st_gid == gid
    if any(_has_group(g) for g in ("qemu", "libvirt-qemu", "kvm")):
        assert name in ("qemu", "libvirt-qemu", "kvm")


def _has_group(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_idempotent_and_shrinks(tmp_path):
    prepare("vm1", 4, str(tmp_path))
    lay = prepare("vm1", 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "vm1")) == sorted(os.path.basename(f) for f in lay.files())
    again = GuestLayout.open(str(tmp_path / "vm1"))
    assert (again.cpus, again.transport, again.name) == (2, "fifo", "vm1")


def test_explicit_group(tmp_path):
    g = grp.getgrgid(os.getegid()).gr_name
    lay = prepare("vm1", 1, str(tmp_path), group=g)
    assert os.lstat(tmp_path / "vm1").st_gid == os.getegid() and lay.group == g
    with pytest.raises(VmtraceError, match="no such group"):
        prepare("vm2", 1, str(tmp_path), group="no-such-group-vmtrace")


def test_socket_layout_and_switch_back(tmp_path):
    lay = prepare("vm1", 2, str(tmp_path), transport="socket")
    for f in lay.files():
        assert stat.S_ISSOCK(os.lstat(f).st_mode) and stat.S_IMODE(os.lstat(f).st_mode) == 0o660
    assert GuestLayout.open("vm1", str(tmp_path)).transport == "socket"
    lay = prepare("vm1", 2, str(tmp_path), transport="fifo")
    assert sorted(os.listdir(tmp_path / "vm1")) == sorted(os.path.basename(f) for f in lay.files())


def test_refuses_symlinked_guest_dir(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "base").mkdir()
    os.symlink(target, tmp_path / "base" / "vm1")
    with pytest.raises(VmtraceError, match="symlink"):
        prepare("vm1", 1, str(tmp_path / "base"))
    assert os.listdir(target) == []
    with pytest.raises(VmtraceError, match="symlink"):
        GuestLayout.open(str(tmp_path / "base" / "vm1"))


def test_refuses_symlinked_base(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(VmtraceError, match="symlink"):
        prepare("vm1", 1, str(tmp_path / "link"))


def test_refuses_planted_symlink_port(tmp_path):
    prepare("vm1", 1, str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.unlink(tmp_path / "vm1" / "trace-path-cpu0.out")
    os.symlink(victim, tmp_path / "vm1" / "trace-path-cpu0.out")
    with pytest.raises(VmtraceError, match="symlink"):
        prepare("vm1", 1, str(tmp_path))
    with pytest.raises(VmtraceError, match="symlink"):
        GuestLayout.open(str(tmp_path / "vm1"))
    assert victim.read_text() == "keep me" and stat.S_IMODE(os.stat(victim).st_mode) != 0o660


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by someone else")
def test_refuses_directory_owned_by_someone_else(tmp_path):
    d = tmp_path / "vm1"
    d.mkdir()
    os.chown(d, NOBODY, -1)
    with pytest.raises(VmtraceError, match="owned by uid %d" % NOBODY):
        prepare("vm1", 1, str(tmp_path))
    (tmp_path / "b").mkdir()
    prepare("vm2", 1, str(tmp_path / "b"))
    os.chown(tmp_path / "b" / "vm2" / "agent-ctl-path.in", NOBODY, -1)
    with pytest.raises(VmtraceError, match="owned by uid"):
        GuestLayout.open(str(tmp_path / "b" / "vm2"))


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "-x", "x" * 65, "a b", "a\nb"])
def test_bad_names(tmp_path, bad):
    with pytest.raises(VmtraceError):
        prepare(bad, 1, str(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(VmtraceError):
        prepare("vm1", 0, str(tmp_path))
    with pytest.raises(VmtraceError):
        prepare("vm1", 1, str(tmp_path), transport="vsock")
    (tmp_path / "file").write_text("")
    with pytest.raises(VmtraceError, match="(?i)not a directory"):
        prepare("file", 1, str(tmp_path))


def test_qemu_args_and_libvirt_xml(tmp_path):
    lay = prepare("vm-1", 2, str(tmp_path))
    args = lay.qemu_args()
    assert args[:2] == ["-device", "virtio-serial-pci,id=vmtvs0"]
    text = " ".join(args)
    for port in ("agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"):
        assert "pipe,id=" in text and ("path=%s" % (tmp_path / "vm-1" / port)) in text
        assert ("name=%s" % port) in text
    ids = [a.split("id=")[1].split(",")[0] for a in args if a.startswith("pipe,")]
    assert len(set(ids)) == 3
    root = ET.fromstring("<devices>%s</devices>" % lay.libvirt_xml())
    chans = root.findall("channel")
    assert [c.get("type") for c in chans] == ["pipe"] * 3
    assert [c.find("target").get("name") for c in chans] == ["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"]
    sock = prepare("vm-2", 1, str(tmp_path), transport="socket")
    assert any(a.startswith("socket,") and "reconnect=1" in a for a in sock.qemu_args())
    root = ET.fromstring("<devices>%s</devices>" % sock.libvirt_xml())
    assert root.find("channel/source").get("mode") == "connect"


def test_cli(tmp_path):
    run = [sys.executable, "-m", "vmtrace", "prepare", "vm1", "--cpus", "1", "--dir", str(tmp_path)]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 0 and "-device virtserialport" in out.stdout and "name=trace-path-cpu0" in out.stdout
    out = subprocess.run(run + ["--libvirt"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("<channel type='pipe'>")
    os.symlink(tmp_path, tmp_path / "evil")
    out = subprocess.run(run[:4] + ["evil", "--cpus", "1", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("vmtrace: error:") and "Traceback" not in out.stderr
