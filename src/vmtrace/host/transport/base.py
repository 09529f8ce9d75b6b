"""What a transport is: everything about a guest's ports that depends on how they are carried.

A guest has one control port and one data port per CPU, under the names the agent
looks for (``agent-ctl-path``, ``trace-path-cpuN``). How each port reaches the host is
the transport's business, and only its: which nodes ``prepare`` leaves in the guest's
directory and how they are recognised again, what QEMU and libvirt are told, how the
recorder opens (or waits for) the ports, what an end of file on them means, and whether
the agent outlives a recording. The rest of the recorder asks a :class:`Transport`
instead of testing its name, so a new one is one more module (see docs/internals.md).

Every node is reached through the guest directory's descriptor and never through a
symlink; :meth:`Transport.check_node` is the one test of "this is still our node".
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import quoteattr

from vmtrace.errors import VmtraceError

if TYPE_CHECKING:
    from vmtrace.host.control import AgentLink


@dataclass(frozen=True)
class Port:
    """One of a guest's ports, as the layout names it for the transport."""

    name: str             # what the agent looks for: agent-ctl-path, trace-path-cpuN
    path: str             # in the guest directory, before the transport's suffixes
    cpu: Optional[int]    # None for the control port


def share_with_group(fd: int, gid: int) -> None:
    """Make an open node 0660 in QEMU's group ``gid``, closing it: set through the
    descriptor, since its name could have been swapped for a link since it was opened."""
    try:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o660)
    finally:
        os.close(fd)


class Ports:
    """One guest's ports while a recording holds them: what has connected, what is awaited.

    The recorder calls :meth:`accept` once per loop turn while :attr:`waiting` is true,
    so a transport whose guest connects later (sockets) never blocks the loop, and one
    whose ports are there from the start (FIFOs) hands everything over at the first call.
    """

    def __init__(self, link: Optional["AgentLink"] = None, data: Optional[Dict[int, int]] = None) -> None:
        self._link = link
        self._data: Dict[int, int] = dict(data or {})

    def accept(self) -> Tuple[Optional["AgentLink"], Dict[int, int]]:
        """What connected since the last call: the control link (or None) and data
        descriptors by CPU, non-blocking. The caller owns them from then on."""
        self._poll()
        link, data = self._link, self._data
        self._link, self._data = None, {}
        return link, data

    def _poll(self) -> None:
        """Move new connections into ``_link`` and ``_data`` (transports that wait)."""

    @property
    def waiting(self) -> bool:
        """Whether some port has not connected yet."""
        return False

    def close(self) -> None:
        """Let go of whatever was never handed over."""
        if self._link is not None:
            self._link.close()
        for fd in self._data.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._link, self._data = None, {}


class Transport:
    """How a guest's ports are carried. Stateless: one instance serves every guest."""

    #: the name users give (``vmtrace prepare --transport NAME``)
    name = ""
    #: the nodes one port leaves in the guest directory: port name + each suffix. Two
    #: transports never share a suffix, and none starts with a digit: the suffix alone
    #: says which transport a ``trace-path-cpuN...`` node belongs to.
    suffixes: Tuple[str, ...] = ("",)
    #: what a node is called in messages ("FIFO", "socket")
    node_kind = ""
    #: an end of file on the control port before anything was read is not the agent
    #: leaving (a FIFO reads EOF until its first writer opens it)
    eof_before_writer = False
    #: the agent outlives a recording and reconnects to the next one, so the recorder
    #: leaves without ``bye`` (which would make the agent restore tracefs and exit)
    agent_stays = False

    # -- on disk ---------------------------------------------------------------------------
    def is_node(self, mode: int) -> bool:
        """Whether ``st_mode`` is this transport's kind of node."""
        raise NotImplementedError

    def make_node(self, dfd: int, leaf: str, gid: int, shown: str) -> None:
        """Create (or check and repair) one node in the guest directory ``dfd``: mode
        0660, group ``gid``, never through a symlink."""
        raise NotImplementedError

    def check_node(self, dfd: int, leaf: str, shown: str) -> os.stat_result:
        """The node ``leaf`` as it is now, if it is ours and of our kind; else an error."""
        try:
            st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise VmtraceError("%s is missing; run vmtrace prepare again" % shown) from None
        if stat.S_ISLNK(st.st_mode):
            raise VmtraceError("%s is a symlink; refusing to follow it" % shown)
        if not self.is_node(st.st_mode):
            raise VmtraceError("%s is not a %s" % (shown, self.node_kind))
        if st.st_uid != os.geteuid():
            raise VmtraceError("%s is owned by uid %d, not by us; refusing to use it" % (shown, st.st_uid))
        return st

    # -- what QEMU and libvirt are told ------------------------------------------------------
    def chardev(self, cid: str, path: str) -> str:
        """The ``-chardev`` value for the port at ``path`` (without suffix)."""
        raise NotImplementedError

    def channel(self, path_attr: str, port: str) -> str:
        """One libvirt ``<channel>`` for the port named ``port``; ``path_attr`` is its
        path (without suffix), already quoted as an XML attribute value."""
        raise NotImplementedError

    def qemu_args(self, guest: str, ports: Sequence[Port], bus: str = "vmtvs0") -> List[str]:
        """QEMU options wiring one virtserialport per port, named as the agent expects.

        A transport that does not go through virtio-serial overrides this whole.
        """
        args = ["-device", "virtio-serial-pci,id=%s" % bus]
        for nr, port in enumerate(ports, start=1):
            cid = "vmt%s%d" % (guest.replace(".", "_").replace("-", "_")[:16], nr)
            if "," in port.path:
                raise VmtraceError("path %s contains ',', which QEMU options cannot carry" % port.path)
            args += ["-chardev", self.chardev(cid, port.path)]
            args += ["-device", "virtserialport,bus=%s.0,nr=%d,chardev=%s,name=%s" % (bus, nr, cid, port.name)]
        return args

    def libvirt_xml(self, ports: Sequence[Port]) -> str:
        """``<channel>`` elements to paste into the domain's ``<devices>``."""
        return "\n".join(self.channel(quoteattr(port.path), port.name) for port in ports) + "\n"

    # -- recording -------------------------------------------------------------------------
    def open_ports(self, dfd: int, guest: str, ports: Sequence[Port], gid: int) -> Ports:
        """``guest``'s ports for one recording, through its checked directory ``dfd``
        (``gid``: the group QEMU runs as, for nodes made anew)."""
        raise NotImplementedError
