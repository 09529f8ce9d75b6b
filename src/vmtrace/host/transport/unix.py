"""Unix sockets, for QEMU's socket chardev (user-facing name ``socket``).

The recorder is the listening side and QEMU connects with ``reconnect=1``, so the
recorder can stop and start again while the guest runs on: when a recording ends the
guest sees its ports hang up and the agent waits for the next recorder (docs/agent.md).
That is why a recording over sockets ends without ``bye``, and why an end of file on a
socket always means the other side is gone. ``prepare`` leaves placeholder socket
inodes so that ``record`` can find the guest's CPU count from the directory alone;
``record`` binds them anew and accepts QEMU's connections as they come.
"""
from __future__ import annotations

import os
import socket
import stat
from typing import Dict, Optional, Sequence

from vmtrace.errors import VmtraceError
from vmtrace.host.control import AgentLink
from vmtrace.host.transport.base import Port, Ports, Transport


class UnixTransport(Transport):
    name = "socket"
    suffixes = ("",)
    node_kind = "socket"
    eof_before_writer = False
    agent_stays = True

    def is_node(self, mode: int) -> bool:
        return stat.S_ISSOCK(mode)

    def make_node(self, dfd: int, leaf: str, gid: int, shown: str) -> None:
        bind_socket(dfd, leaf, gid, shown).close()

    def chardev(self, cid: str, path: str) -> str:
        return "socket,id=%s,path=%s,reconnect=1" % (cid, path)

    def channel(self, path_attr: str, port: str) -> str:
        return ("<channel type='unix'>\n  <source mode='connect' path=%s>\n"
                "    <reconnect enabled='yes' timeout='1'/>\n  </source>\n"
                "  <target type='virtio' name='%s'/>\n</channel>" % (path_attr, port))

    def open_ports(self, dfd: int, guest: str, ports: Sequence[Port], gid: int) -> Ports:
        """Listen on every port; QEMU (or an agent) connects later."""
        listeners: Dict[Optional[int], socket.socket] = {}
        try:
            for port in ports:
                listeners[port.cpu] = bind_socket(dfd, os.path.basename(port.path), gid, port.path)
        except BaseException:
            for lsock in listeners.values():
                lsock.close()
            raise
        for lsock in listeners.values():
            lsock.setblocking(False)
        return _Listening(guest, listeners)


class _Listening(Ports):
    """Listening sockets by CPU (None: control), each closed once its one connection
    is accepted."""

    def __init__(self, name: str, listeners: Dict[Optional[int], socket.socket]):
        super().__init__()
        self.name = name
        self.listeners = listeners

    @property
    def waiting(self) -> bool:
        return bool(self.listeners)

    def _poll(self) -> None:
        for key, lsock in list(self.listeners.items()):
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            lsock.close()
            del self.listeners[key]
            conn.setblocking(False)
            if key is None:
                fd = conn.detach()
                self._link = AgentLink(self.name, fd, fd, eof_before_writer=UnixTransport.eof_before_writer)
            else:
                self._data[key] = conn.detach()

    def close(self) -> None:
        for lsock in self.listeners.values():
            lsock.close()
        self.listeners.clear()
        super().close()


def bind_socket(dfd: int, leaf: str, gid: int, shown: str) -> socket.socket:
    """Bind a listening unix socket at ``leaf``, replacing our own stale socket inode.

    Binding through ``/proc/self/fd/N/leaf`` keeps the directory pinned by descriptor,
    so a directory swapped for a symlink after the checks cannot redirect the bind.
    """
    try:
        st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise VmtraceError("%s exists and is not our socket; refusing to replace it" % shown)
        os.unlink(leaf, dir_fd=dfd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        where = "/proc/self/fd/%d/%s" % (dfd, leaf)
        if len(where.encode()) > 100 or not os.path.isdir("/proc/self/fd"):
            where = shown
        sock.bind(where)
        sock.listen(4)
        os.chown(leaf, -1, gid, dir_fd=dfd, follow_symlinks=False)
        os.chmod(where, 0o660)
    except OSError as exc:
        sock.close()
        raise VmtraceError("cannot listen on %s: %s" % (shown, exc.strerror)) from None
    return sock
