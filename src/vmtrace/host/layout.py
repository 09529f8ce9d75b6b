"""A guest's rendezvous directory on the host: the ports QEMU connects to.

The names are the seed's (``trace-path-cpuN``, ``agent-ctl-path``) because the guest
agent finds its ports by those names. What stands under each name (FIFOs, sockets) is
the transport's business (:mod:`vmtrace.host.transport`); this module owns the
directory, the names and the CPU count, and finds which transport a directory holds
from its nodes alone.

Permissions are the point of this module. The directory is ``0710`` and belongs to the
recording user with the group QEMU runs as, so QEMU can reach the files inside but
nobody else can even list them. Everything is created and checked relative to an open
directory descriptor with ``O_NOFOLLOW``, so a symlink planted in the path (or a
directory somebody else owns) is refused instead of followed: the recorder runs as
root and must not be talked into writing somewhere else.
"""
from __future__ import annotations

import grp
import os
import re
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from vmtrace.errors import VmtraceError
from vmtrace.host.transport import Port, Ports, Transport, get_transport, transport_names

CTL = "agent-ctl-path"
CPU = "trace-path-cpu%d"
QEMU_GROUPS = ("qemu", "libvirt-qemu", "kvm")
MAX_CPUS = 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_PORT_NODE = re.compile(r"^(agent-ctl-path|trace-path-cpu(\d+))(.*)\Z")


def check_guest_name(name: str) -> str:
    """Guest names become directory and file names, so only a safe alphabet is allowed."""
    if not _NAME.match(name or "") or name in (".", ".."):
        raise VmtraceError(
            "bad guest name %r: use 1-64 letters, digits, '_', '.', '-' (not starting with '.' or '-')" % name
        )
    return name


def default_base() -> str:
    """Where guest directories live when --dir is not given.

    Root gets the system-wide place libvirt users expect; an ordinary user gets their
    runtime directory (tmpfs, private, cleaned at logout) or a private one under /tmp.
    """
    if os.geteuid() == 0:
        return "/var/lib/vmtrace"
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return os.path.join(run, "vmtrace")
    return "/tmp/vmtrace-%d" % os.geteuid()


def qemu_group(requested: Optional[str] = None) -> tuple[str, int]:
    """The group that QEMU runs as here: --group if given, else the first that exists."""
    if requested:
        try:
            if requested.isdigit():
                return grp.getgrgid(int(requested)).gr_name, int(requested)
            return requested, grp.getgrnam(requested).gr_gid
        except KeyError:
            raise VmtraceError("no such group %r (--group)" % requested) from None
    for name in QEMU_GROUPS:
        try:
            return name, grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    gid = os.getegid()
    try:
        return grp.getgrgid(gid).gr_name, gid
    except KeyError:
        return str(gid), gid


def _check_dir_stat(st: os.stat_result, path: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise VmtraceError("%s is a symlink; refusing to follow it" % path)
    if not stat.S_ISDIR(st.st_mode):
        raise VmtraceError("%s exists and is not a directory" % path)
    if st.st_uid not in (os.geteuid(), 0):
        raise VmtraceError("%s is owned by uid %d, not by us; refusing to use it" % (path, st.st_uid))


def _open_dir(path: str, create_mode: Optional[int] = None, strict_owner: bool = False) -> int:
    """Open (and maybe create) one directory without following symlinks anywhere in it."""
    path = os.path.abspath(path)
    parent, leaf = os.path.split(path)
    if create_mode is not None and parent != path:
        try:
            os.lstat(path)
        except FileNotFoundError:
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o755, exist_ok=True)
            try:
                os.mkdir(path, create_mode)
            except FileExistsError:
                pass
            except OSError as exc:
                raise VmtraceError("cannot create %s: %s" % (path, exc.strerror)) from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise VmtraceError("cannot use %s: %s" % (path, exc.strerror)) from None
    _check_dir_stat(st, path)
    if strict_owner and st.st_uid != os.geteuid():
        raise VmtraceError("%s is owned by uid %d, not by us; refusing to use it" % (path, st.st_uid))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VmtraceError("cannot open %s: %s" % (path, exc.strerror)) from None
    st2 = os.fstat(fd)
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise VmtraceError("%s changed while we opened it; refusing" % path)
    return fd


def _port_node(entry: str) -> Optional[Tuple[Optional[int], Transport]]:
    """Whose node a directory entry is: its port's CPU (None for the control port) and
    the transport that makes nodes with its suffix; None for anything else."""
    m = _PORT_NODE.match(entry)
    if not m:
        return None
    for name in transport_names():
        t = get_transport(name)
        if m.group(3) in t.suffixes:
            return (int(m.group(2)) if m.group(2) is not None else None), t
    return None


@dataclass
class GuestLayout:
    """A prepared guest directory: what QEMU needs and what the recorder opens."""

    name: str
    path: str
    cpus: int
    transport: str = "fifo"
    group: str = ""
    gid: int = -1

    @property
    def backend(self) -> Transport:
        """The :class:`~vmtrace.host.transport.Transport` that ``transport`` names."""
        return get_transport(self.transport)

    # -- names -----------------------------------------------------------------------
    @property
    def ctl(self) -> str:
        """The chardev path of the control port (FIFOs add .in/.out to it)."""
        return os.path.join(self.path, CTL)

    def cpu(self, n: int) -> str:
        return os.path.join(self.path, CPU % n)

    def port_names(self) -> List[str]:
        return [CTL] + [CPU % n for n in range(self.cpus)]

    def ports(self) -> List[Port]:
        """The ports as the transport gets them: control first, then one per CPU."""
        return [Port(CTL, self.ctl, None)] + [Port(CPU % n, self.cpu(n), n) for n in range(self.cpus)]

    def files(self) -> List[str]:
        """Every file this layout puts in the directory."""
        return [p.path + s for p in self.ports() for s in self.backend.suffixes]

    # -- what QEMU and libvirt need ----------------------------------------------------
    def qemu_args(self, bus: str = "vmtvs0") -> List[str]:
        """QEMU options wiring the ports, named as the agent expects."""
        return self.backend.qemu_args(self.name, self.ports(), bus)

    def libvirt_xml(self) -> str:
        """``<channel>`` elements to paste into the domain's ``<devices>``."""
        return self.backend.libvirt_xml(self.ports())

    # -- recording ---------------------------------------------------------------------
    def open_ports(self) -> Ports:
        """The ports for one recording, opened (or listened on) through the checked directory."""
        dfd = open_dir_checked(self.path)
        try:
            return self.backend.open_ports(dfd, self.name, self.ports(), self.gid)
        finally:
            os.close(dfd)

    # -- discovery (used by record) ----------------------------------------------------
    @classmethod
    def open(cls, guest: str, base: Optional[str] = None) -> "GuestLayout":
        """Find a prepared guest by name (under ``base``) or by its directory path.

        The checks are those of :func:`prepare`: a directory that is a symlink or owned by
        someone else is refused before anything in it is opened.
        """
        if os.sep in guest:
            path = os.path.abspath(guest)
            name = check_guest_name(os.path.basename(path.rstrip(os.sep)))
        else:
            name = check_guest_name(guest)
            path = os.path.join(base or default_base(), name)
        dfd = _open_dir(path)
        try:
            st = os.fstat(dfd)
            cpus = set()
            kinds: Dict[str, Transport] = {}
            for entry in os.listdir(dfd):
                node = _port_node(entry)
                if node is not None and node[0] is not None:
                    cpus.add(node[0])
                    kinds[node[1].name] = node[1]
            if not cpus:
                raise VmtraceError("%s has no trace-path-cpuN ports; run vmtrace prepare %s first" % (path, name))
            if len(kinds) > 1:
                raise VmtraceError("%s mixes %s; run vmtrace prepare again"
                                   % (path, " and ".join(sorted(t.node_kind + "s" for t in kinds.values()))))
            n = max(cpus) + 1
            if cpus != set(range(n)):
                raise VmtraceError("%s: trace-path-cpuN ports are not numbered 0..%d" % (path, n - 1))
            backend = next(iter(kinds.values()))
            lay = cls(name=name, path=path, cpus=n, transport=backend.name, gid=st.st_gid)
            try:
                lay.group = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                lay.group = str(st.st_gid)
            for f in lay.files():
                backend.check_node(dfd, os.path.basename(f), f)
            return lay
        finally:
            os.close(dfd)


def open_dir_checked(path: str) -> int:
    """A descriptor for a guest directory, after the same checks as ``prepare``."""
    return _open_dir(path)


def prepare(
    name: str,
    cpus: int,
    dir: Optional[str] = None,
    transport: str = "fifo",
    group: Optional[str] = None,
) -> GuestLayout:
    """Create (or check and repair) the guest's directory and its transport's nodes.

    Idempotent: running it again on our own directory fixes modes and groups and
    removes ports of CPUs the guest no longer has, but anything we do not own, or any
    symlink, stops it with an error.
    """
    check_guest_name(name)
    backend = get_transport(transport)
    if not isinstance(cpus, int) or not 1 <= cpus <= MAX_CPUS:
        raise VmtraceError("bad CPU count %r (1..%d)" % (cpus, MAX_CPUS))
    gname, gid = qemu_group(group)
    base = os.path.abspath(dir or default_base())
    bfd = _open_dir(base, create_mode=0o755)
    try:
        path = os.path.join(base, name)
        try:
            os.mkdir(name, 0o700, dir_fd=bfd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise VmtraceError("cannot create %s: %s" % (path, exc.strerror)) from None
        try:
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=bfd)
        except OSError as exc:
            if os.path.islink(path):
                raise VmtraceError("%s is a symlink; refusing to follow it" % path) from None
            raise VmtraceError("cannot open %s: %s" % (path, exc.strerror)) from None
    finally:
        os.close(bfd)
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid():
            raise VmtraceError("%s is owned by uid %d, not by us; refusing to use it" % (path, st.st_uid))
        os.fchown(dfd, -1, gid)
        os.fchmod(dfd, 0o710)
        lay = GuestLayout(name=name, path=path, cpus=cpus, transport=transport, group=gname, gid=gid)
        for entry in os.listdir(dfd):
            node = _port_node(entry)
            if node is None:
                continue
            cpu, owner = node
            # another transport's node (a switch), or a CPU the guest no longer has
            if owner.name != backend.name or (cpu is not None and cpu >= cpus):
                owner.check_node(dfd, entry, os.path.join(path, entry))
                os.unlink(entry, dir_fd=dfd)
        for f in lay.files():
            backend.make_node(dfd, os.path.basename(f), gid, f)
        return lay
    finally:
        os.close(dfd)
