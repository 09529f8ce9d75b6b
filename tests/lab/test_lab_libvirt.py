"""`vmtrace prepare --libvirt`: its <channel> XML in a real libvirt domain.

Debian's libvirt-daemon-system runs here even without systemd, once libvirtd and
virtlogd are started by hand: the fixture starts the ones that are not running and
stops exactly those afterwards. The domain is `<domain type='qemu'>` (TCG); the guest
sends raw ring-buffer pages through the prepared FIFOs, and the host checks they are
whole pages with kernel timestamps.
"""
from __future__ import annotations

import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from labguest import lab_image
from vmtrace.host.layout import prepare
from vmtrace.lab import libvirt, qemu

URI = "qemu:///system"


def _virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def libvirtd():
    if not (shutil.which("libvirtd") and shutil.which("virsh") and shutil.which("virtlogd")):
        pytest.skip("libvirt-daemon-system is not installed")
    if os.geteuid() != 0:
        pytest.skip("qemu:///system needs root")
    started = []
    if not Path("/run/libvirt/virtlogd-sock").exists():
        started.append(subprocess.Popen(["virtlogd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if _virsh("uri", timeout=10).returncode != 0:
        started.append(subprocess.Popen(["libvirtd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    while _virsh("uri", timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("libvirtd did not answer within 30 s")
        time.sleep(0.5)
    yield
    for proc in reversed(started):
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def lvdir():
    """A dir libvirt's QEMU (user libvirt-qemu) can traverse: pytest's tmp_path cannot."""
    d = Path(tempfile.mkdtemp(prefix="vmtrace-lv-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _domain(tmp: Path, name: str, script: str):
    img = lab_image()
    lay = prepare(name, 2, str(tmp))
    initrd = qemu.make_initrd(img, tmp / "initrd.gz", script)
    initrd.chmod(0o644)
    xml = libvirt.domain_xml("vmtrace-" + name, img.kernel, initrd, qemu.kernel_cmdline("lv", 3),
                             lay.libvirt_xml(), tmp / "console.log")
    path = tmp / "domain.xml"
    path.write_text(xml)
    return lay, path


def test_prepared_channels_make_a_valid_domain(lvdir):
    tmp_path = lvdir
    if shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None:
        pytest.skip("needs virt-xml-validate and xmllint (libvirt-clients, libxml2-utils)")
    _, path = _domain(tmp_path, "lvxml", "true")
    libvirt.validate(path)
    broken = tmp_path / "broken.xml"
    broken.write_text(path.read_text().replace("<vcpu>", "<vcpus>").replace("</vcpu>", "</vcpus>"))
    with pytest.raises(Exception, match="not a valid libvirt domain"):
        libvirt.validate(broken)


@pytest.mark.vm
@pytest.mark.slow
def test_libvirt_domain_from_prepare_is_traced(lvdir, libvirtd):
    tmp_path = lvdir
    script = r""". /lab/lib.sh
echo 1 > $T/events/sched/enable
echo 1 > $T/tracing_on
pingpong 0.5 > /dev/null
echo 0 > $T/tracing_on
for c in 0 1; do timeout 2 cat $T/per_cpu/cpu$c/trace_pipe_raw > /dev/virtio-ports/trace-path-cpu$c; done
echo sent
"""
    name = f"lv{os.getpid()}"
    lay, path = _domain(tmp_path, name, script)
    # O_RDWR: we hold a writer ourselves, so libvirt probing the FIFO cannot give us EOF.
    fds = {os.open(lay.cpu(c) + ".out", os.O_RDWR | os.O_NONBLOCK): c for c in range(2)}
    got = {0: bytearray(), 1: bytearray()}
    res = _virsh("create", str(path))
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds), [], [], 0.5)
            for fd in ready:
                got[fds[fd]] += os.read(fd, 1 << 20)
            if not ready and "running" not in _virsh("domstate", "vmtrace-" + name).stdout:
                break
    finally:
        _virsh("destroy", "vmtrace-" + name)
        for fd in fds:
            os.close(fd)
    console = (tmp_path / "console.log").read_text(errors="replace")
    assert "READY cpus=2 ports=3" in console and "sent" in console
    for cpu, data in got.items():
        assert data and len(data) % 4096 == 0, (cpu, len(data))
        stamps = [struct.unpack_from("<Q", data, off)[0] for off in range(0, len(data), 4096)]
        assert all(s > 0 for s in stamps) and stamps == sorted(stamps)
