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


def test_bytecode_is_used_whatever_the_source_mtime(tmp_path):
    """Unchecked-hash .pyc: the guest's sources have mtime 0 and it writes no bytecode."""
    py = pyruntime.collect()
    src = tmp_path / "pkg" / "labmod.py"
    src.parent.mkdir()
    src.write_text("X = 1\n")
    pycs, summary = pyruntime.compile_bytecode(py, [(str(src), src)], tmp_path / "out")
    assert summary["failed"] == [] and len(pycs) == 1
    guest_pyc, built = pycs[0]
    assert guest_pyc == str(src.parent / "__pycache__" / f"labmod.{py.cache_tag}.pyc")
    assert int.from_bytes(built.read_bytes()[4:8], "little") == 0b01   # hash, unchecked
    Path(guest_pyc).parent.mkdir()
    Path(guest_pyc).write_bytes(built.read_bytes())
    src.write_text("X = 2\n")                   # same size; as in the initramfs, mtime 0
    os.utime(src, (0, 0))
    out = subprocess.run([str(py.executable), "-S", "-c", "import labmod; print(labmod.X)"],
                         cwd=src.parent, env={"PYTHONDONTWRITEBYTECODE": "1"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1"


def _cpio_list(img) -> list:
    with open(img.initrd, "rb") as f:
        return subprocess.run(["cpio", "-it", "--quiet"], stdin=f, capture_output=True,
                              timeout=60, check=True).stdout.decode().split()


def _cpio_extract(img, dest, *names) -> None:
    with open(img.initrd, "rb") as f:
        subprocess.run(["cpio", "-id", "--quiet", *names], stdin=f, cwd=dest, timeout=60,
                       check=True, capture_output=True)


def test_image_ships_bytecode_for_its_python_and_the_agent(tmp_path):
    img = lab_image()
    py = pyruntime.collect()
    names = _cpio_list(img)
    have = set(names)
    stdlib_py = [n for n in names if n.endswith(".py") and not n.startswith("lab/")]
    assert stdlib_py
    missing = [n for n in stdlib_py
               if pyruntime.pyc_path(n, py.cache_tag) not in have]
    assert missing == []
    assert img.manifest["python"]["bytecode"]["failed"] == 0
    assert not any(n.endswith("/sitecustomize.py") for n in names)
    os_pyc = next(n for n in names if n.endswith(f"/__pycache__/os.{py.cache_tag}.pyc"))
    # the agent: unpacked with __pycache__, and the zipapp with NAME.pyc beside each module
    assert "lab/agent/__main__.py" in have
    assert f"lab/agent/vmtrace/agent/__pycache__/core.{py.cache_tag}.pyc" in have
    _cpio_extract(img, tmp_path, "lab/agent.pyz", os_pyc)
    assert int.from_bytes((tmp_path / os_pyc).read_bytes()[4:8], "little") == 0b01
    pyz = tmp_path / "lab" / "agent.pyz"
    probe = ("import sys, zipimport; z = zipimport.zipimporter(sys.argv[1] + '/vmtrace/agent/');"
             "print(z.get_filename('vmtrace.agent.core'))")
    out = subprocess.run([str(py.executable), "-c", probe, str(pyz)], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip().endswith("core.pyc"), out.stderr
    run = subprocess.run([str(py.executable), str(pyz), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "usage:" in run.stdout


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
echo "bytecode $(python3 -v -c 'import json' 2>&1 | grep -c 'json/__pycache__/__init__.*pyc matches')"
echo "agent $(python3 /lab/agent.pyz --help | head -n 1)"
echo "agentdir $(python3 /lab/agent --help | head -n 1)"
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
    assert "bytecode 1" in lines                 # the stdlib loads from its .pyc
    assert any(l.startswith("agent usage:") for l in lines)
    assert any(l.startswith("agentdir usage:") for l in lines)
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
