"""Find and open the agent's ports: virtio-serial devices, or FIFOs/sockets in a directory.

Guests built from a busybox initramfs have no udev, so ``/dev/virtio-ports/NAME``
links never appear; the kernel still publishes each port's name in
``/sys/class/virtio-ports/vportNpM/name`` and the device as ``/dev/vportNpM``. We try
the link first and fall back to sysfs. ``--ports DIR`` swaps the transport for a
directory of FIFOs or unix sockets with the same names, for tests and other transports;
a directory made by ``vmtrace prepare`` works as it is (FIFOs named ``NAME.in`` for
host -> guest and ``NAME.out`` for guest -> host, as QEMU's pipe chardev names them).

Opening never blocks forever: a FIFO without a reader or a socket without a listener is
retried until the caller says stop, so SIGINT during setup still ends the agent.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import time
from typing import Callable, Dict, Iterable, Optional

from vmtrace.errors import VmtraceError

CTL_PORT = "agent-ctl-path"
DEV_DIR = "/dev/virtio-ports"
SYS_DIR = "/sys/class/virtio-ports"


def data_port_name(cpu: int) -> str:
    return "trace-path-cpu%d" % cpu


class PortSpec:
    """Where a named port lives and what it is: ``virtio``, ``fifo`` or ``socket``."""

    def __init__(self, name: str, path: str, kind: str):
        self.name, self.path, self.kind = name, path, kind

    def __repr__(self) -> str:
        return "PortSpec(%s, %s, %s)" % (self.name, self.path, self.kind)


def _virtio_by_sysfs(sys_dir: str, dev_root: str) -> Dict[str, str]:
    found: Dict[str, str] = {}
    try:
        entries = sorted(os.listdir(sys_dir))
    except OSError:
        return found
    for vport in entries:
        try:
            with open(os.path.join(sys_dir, vport, "name")) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name:
            found[name] = os.path.join(dev_root, vport)
    return found


def locate(
    names: Iterable[str],
    ports_dir: Optional[str] = None,
    dev_dir: str = DEV_DIR,
    sys_dir: str = SYS_DIR,
    dev_root: str = "/dev",
) -> Dict[str, PortSpec]:
    """Map each wanted port name that exists to a PortSpec; missing names are absent."""
    out: Dict[str, PortSpec] = {}
    names = list(names)
    if ports_dir is not None:
        for name in names:
            path = os.path.join(ports_dir, name)
            try:
                mode = os.stat(path).st_mode
            except OSError:
                # A directory made by `vmtrace prepare` for QEMU's pipe chardev: the
                # guest reads orders from NAME.in and writes pages to NAME.out.
                path += ".in" if name == CTL_PORT else ".out"
                try:
                    mode = os.stat(path).st_mode
                except OSError:
                    continue
                if not stat.S_ISFIFO(mode):
                    continue
            if stat.S_ISFIFO(mode):
                out[name] = PortSpec(name, path, "fifo")
            elif stat.S_ISSOCK(mode):
                out[name] = PortSpec(name, path, "socket")
            elif stat.S_ISCHR(mode):
                out[name] = PortSpec(name, path, "virtio")
            else:
                raise VmtraceError("port %s is neither a FIFO, a unix socket nor a device" % path)
        return out
    sysfs: Optional[Dict[str, str]] = None
    for name in names:
        link = os.path.join(dev_dir, name)
        if os.path.exists(link):
            out[name] = PortSpec(name, link, "virtio")
            continue
        if sysfs is None:
            sysfs = _virtio_by_sysfs(sys_dir, dev_root)
        if name in sysfs and os.path.exists(sysfs[name]):
            out[name] = PortSpec(name, sysfs[name], "virtio")
    return out


def reply_path(spec: PortSpec) -> Optional[str]:
    """Where a FIFO control port's replies go: ``agent-ctl-path.out`` beside it."""
    if spec.kind != "fifo":
        return None
    base = spec.path[:-3] if spec.path.endswith(".in") else spec.path
    return base + ".out"


def _connect(path: str) -> Optional[int]:
    import socket  # only for socket ports (--ports DIR): a virtio guest never pays for it

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
            return None
        raise VmtraceError("cannot connect to port %s: %s" % (path, exc.strerror))
    return s.detach()


def open_port(spec: PortSpec, write_only: bool, should_stop: Callable[[], bool], wait_note: bool = True) -> Optional[int]:
    """Open a port non-blocking; wait (retrying) for a FIFO reader or socket listener.

    Returns None if ``should_stop()`` became true while waiting.
    """
    noted = False
    while True:
        try:
            if spec.kind == "socket":
                fd = _connect(spec.path)
            elif spec.kind == "fifo" and not write_only:
                # O_RDWR on a FIFO keeps one writer (us) alive, so the host closing its
                # end does not turn the port into an endless EOF.
                fd = os.open(spec.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            else:
                flags = (os.O_WRONLY if write_only else os.O_RDWR) | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(spec.path, flags)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: FIFO without a reader yet
                raise VmtraceError("cannot open port %s: %s" % (spec.path, exc.strerror))
            fd = None
        if fd is not None:
            os.set_blocking(fd, False)
            return fd
        if should_stop():
            return None
        if wait_note and not noted:
            print("vmtrace-agent: waiting for the host to open %s" % spec.path, file=sys.stderr)
            noted = True
        time.sleep(0.05)
