"""The lab guest: image building blocks on the host, and a real TCG boot."""
from __future__ import annotations

import gzip
import io
import os
import subprocess
from pathlib import Path

import pytest

from labguest import lab_image
from vmtrace.cli import main as cli_main
from vmtrace.errors import VmtraceError
from vmtrace.lab import cpio, kernel, pyruntime
from vmtrace.lab.qemu import Guest, count_serial_ports, overlay_archive


def test_cpio_archive_is_read_back_by_gnu_cpio(tmp_path):
    buf = io.BytesIO()
    w = cpio.CpioWriter(buf)
    w.add_bytes("a/b/hello.txt", b"hello\n", 0o644)
    w.add_bytes("odd", b"xyz", 0o755)       # sizes that need padding
    w.add_symlink("a/link", "b/hello.txt")
    w.add_chardev("dev/console", 5, 1)
    w.add_bytes("a/b/hello.txt", b"second copy is ignored")
    w.close()
    out = tmp_path / "x"
    out.mkdir()
    listing = subprocess.run(["cpio", "-it"], input=buf.getvalue(), capture_output=True,
                             timeout=30, check=True).stdout.decode().split()
    assert listing == ["a", "a/b", "a/b/hello.txt", "odd", "a/link", "dev", "dev/console"]
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=buf.getvalue(),
                   cwd=out, timeout=30, check=True, capture_output=True)
    assert (out / "a/b/hello.txt").read_bytes() == b"hello\n"
    assert (out / "odd").read_bytes() == b"xyz" and os.access(out / "odd", os.X_OK)
    assert os.readlink(out / "a/link") == "b/hello.txt"


def test_cpio_refuses_paths_that_escape():
    w = cpio.CpioWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.add_bytes("../etc/passwd", b"")


def test_overlay_is_a_gzip_cpio_with_the_script():
    data = overlay_archive("echo hi\n", {"lab/extra": b"1"})
    listing = subprocess.run(["cpio", "-it"], input=gzip.decompress(data), capture_output=True,
                             timeout=30, check=True).stdout.decode().split()
    assert "lab/run.sh" in listing and "lab/extra" in listing


def test_modules_are_ordered_dependencies_first():
    k = kernel.find_kernel()
    names = [kernel._module_name(p.name) for p in k.modules]
    assert names[-1] in ("virtio_console", "virtio_pci")
    for needed, user in (("virtio", "virtio_pci"), ("virtio_ring", "virtio_console"),
                         ("virtio", "virtio_console")):
        assert names.index(needed) < names.index(user)
    assert all(p.is_file() for p in k.modules)


def test_missing_kernel_is_one_clear_error(tmp_path):
    with pytest.raises(VmtraceError, match="not found"):
        kernel.find_kernel(tmp_path / "vmlinuz-nothing")
    with pytest.raises(VmtraceError, match="no Debian cloud kernel"):
        kernel.find_kernel(boot=tmp_path)


def test_python_runtime_leaves_out_tests_and_gui():
    py = pyruntime.collect()
    paths = [g for g, _ in py.files]
    assert any(p.endswith("/os.py") for p in paths)
    assert any("ld-linux" in p for p in paths)           # the loader the binary names
    assert not any("/tkinter/" in p or "/idlelib/" in p or "/site-packages/" in p for p in paths)
    assert py.version >= (3, 9)


def test_serial_ports_are_counted_from_the_command_line():
    args = ["-device", "virtio-serial-pci,id=v", "-device", "virtserialport,bus=v.0,nr=1,name=a",
            "-chardev", "pipe,id=c,path=/x", "-device", "virtserialport,bus=v.0,nr=2,name=b"]
    assert count_serial_ports(args) == 2


def test_image_is_cached_by_its_inputs():
    from vmtrace.lab.image import build_image
    first = lab_image()
    mtime = first.initrd.stat().st_mtime_ns
    again = build_image()
    assert again.key == first.key and again.initrd == first.initrd
    assert again.initrd.stat().st_mtime_ns == mtime      # reused, not rebuilt
    assert {"intloop", "pingpong"} <= set(first.manifest["workloads"])


def test_lab_run_rejects_bad_input_in_one_line(capsys):
    assert cli_main(["lab", "run", "--seconds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vmtrace: error: --seconds must be positive"]


@pytest.mark.vm
@pytest.mark.slow
def test_guest_boots_with_named_ports_cpus_python_and_tracefs(tmp_path):
    """A real TCG boot wired by `prepare`: port names, CPUs, Python and events in tracefs."""
    from vmtrace.host.layout import prepare
    img = lab_image()
    lay = prepare("labtest", 2, str(tmp_path))
    script = r"""
for p in /dev/virtio-ports/*; do echo "port ${p##*/}"; done
echo "nproc $(grep -c ^processor /proc/cpuinfo)"
python3 -c 'import sys; print("python", sys.version_info[0], sys.version_info[1])'
T=/sys/kernel/tracing
echo 1 > $T/events/sched/sched_switch/enable
echo 1 > $T/tracing_on
pingpong 0.3 > /dev/null
echo 0 > $T/tracing_on
echo "switches $(grep -c 'sched_switch:' $T/trace)"
echo "clock $(cat $T/trace_clock)"
exit 7
"""
    with Guest(img, script=script, qemu_args=lay.qemu_args(), smp=2, accel="tcg") as g:
        ready = g.wait_ready(90)
        assert ready["cpus"] == "2" and ready["ports"] == "3"
        assert g.wait_exit(120) == 7
        lines = g.script_lines()
    assert g.running is False
    ports = sorted(l.split()[1] for l in lines if l.startswith("port "))
    assert ports == ["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"]
    assert "nproc 2" in lines
    assert "python 3" in " ".join(lines)
    switches = [int(l.split()[1]) for l in lines if l.startswith("switches ")]
    assert switches and switches[0] > 10
    assert any(l.startswith("clock ") and "[" in l for l in lines)


@pytest.mark.vm
def test_a_guest_that_never_boots_is_killed_with_a_clear_error(tmp_path):
    """A kernel that cannot start: wait_ready gives one line and QEMU is gone."""
    img = lab_image()
    from dataclasses import replace
    bogus = tmp_path / "vmlinuz-bogus"
    bogus.write_bytes(b"\0" * 4096)
    with Guest(replace(img, kernel=bogus), accel="tcg") as g:
        with pytest.raises(VmtraceError):
            g.wait_ready(20)
        assert not g.running
