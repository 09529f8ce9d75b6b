"""FIFOs, for QEMU's pipe chardev: ``P.in`` carries host -> guest, ``P.out`` guest -> host.

The recorder holds both ends open for the whole recording, so a guest can come and go
under it; what a FIFO cannot do is tell the agent that the host left, which is why a
recording over FIFOs ends with ``bye`` and the agent exits.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Dict, Optional, Sequence

from vmtrace.errors import VmtraceError
from vmtrace.host.control import AgentLink
from vmtrace.host.transport.base import Port, Ports, Transport, share_with_group


class FifoTransport(Transport):
    name = "fifo"
    suffixes = (".in", ".out")
    node_kind = "FIFO"
    eof_before_writer = True  # an O_RDONLY FIFO reads EOF until QEMU (or an agent) opens it
    agent_stays = False

    def is_node(self, mode: int) -> bool:
        return stat.S_ISFIFO(mode)

    def make_node(self, dfd: int, leaf: str, gid: int, shown: str) -> None:
        try:
            os.mkfifo(leaf, 0o600, dir_fd=dfd)
        except FileExistsError:
            self.check_node(dfd, leaf, shown)
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; O_NOFOLLOW:
        # the name was checked above but could be swapped for a link in between.
        fd = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise VmtraceError("%s is not a FIFO" % shown)
        share_with_group(fd, gid)

    def chardev(self, cid: str, path: str) -> str:
        return "pipe,id=%s,path=%s" % (cid, path)

    def channel(self, path_attr: str, port: str) -> str:
        return ("<channel type='pipe'>\n  <source path=%s/>\n  <target type='virtio' name='%s'/>\n</channel>"
                % (path_attr, port))

    def open_ports(self, dfd: int, guest: str, ports: Sequence[Port], gid: int) -> Ports:
        """Everything at once: a FIFO is there before its writer, so nothing is waited for."""
        link = open_link(guest, next(p.path for p in ports if p.cpu is None), dir_fd=dfd)
        data: Dict[int, int] = {}
        try:
            for port in ports:
                if port.cpu is not None:
                    leaf = os.path.basename(port.path) + ".out"
                    data[port.cpu] = open_port(dfd, leaf, os.O_RDONLY, port.path + ".out")
        except BaseException:
            Ports(link, data).close()
            raise
        return Ports(link, data)


def open_link(name: str, ctl_base: str, dir_fd: Optional[int] = None) -> AgentLink:
    """The control link over a pipe chardev's FIFOs: we write ``.in`` and read ``.out``.

    ``.in`` is opened read-write so the open never blocks or fails for want of a
    reader (QEMU or a test agent may come later); ``.out`` is read non-blocking.
    With ``dir_fd`` (the guest directory, opened and checked) the names are opened
    relative to it and never through a symlink.
    """
    try:
        if dir_fd is not None:
            leaf = os.path.basename(ctl_base)
            rfd = open_port(dir_fd, leaf + ".out", os.O_RDONLY, ctl_base + ".out")
            try:
                wfd = open_port(dir_fd, leaf + ".in", os.O_RDWR, ctl_base + ".in")
            except VmtraceError:
                os.close(rfd)
                raise
        else:
            rfd = os.open(ctl_base + ".out", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            wfd = os.open(ctl_base + ".in", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise VmtraceError("cannot open control FIFOs %s.{in,out}: %s" % (ctl_base, exc.strerror)) from None
    return AgentLink(name, rfd, wfd, eof_before_writer=FifoTransport.eof_before_writer)


def open_port(dfd: int, leaf: str, flags: int, shown: str) -> int:
    """Open a prepared FIFO by name inside its checked directory ``dfd``: never through
    a symlink (``O_NOFOLLOW``), never blocking, and only if it is still our FIFO.

    ``GuestLayout.open`` checked the names already; this closes the window between that
    check and the open, in which a port could have been swapped for a link.
    """
    try:
        fd = os.open(leaf, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VmtraceError("%s is a symlink; refusing to follow it" % shown) from None
        raise VmtraceError("cannot open %s: %s" % (shown, exc.strerror)) from None
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise VmtraceError("%s is no longer our FIFO; refusing to use it" % shown)
    return fd
