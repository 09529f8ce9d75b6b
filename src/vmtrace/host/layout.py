"""A guest's rendezvous directory on the host: the FIFOs or sockets QEMU connects to.

The names are the seed's (``trace-path-cpuN``, ``agent-ctl-path``) because the guest
agent finds its ports by those names, and QEMU's ``-chardev pipe,path=P`` opens
``P.in`` (host -> guest) and ``P.out`` (guest -> host).

Permissions are the point of this module. The directory is ``0710`` and belongs to the
recording user with the group QEMU runs as, so QEMU can reach the files inside but
nobody else can even list them. Everything is created and checked relative to an open
directory descriptor with ``O_NOFOLLOW``, so a symlink planted in the path (or a
directory somebody else owns) is refused instead of followed: the recorder runs as
root and must not be talked into writing somewhere else.

Sockets: the recorder is the listening side and QEMU connects with ``reconnect=1``, so
the recorder can be stopped and started again while the guest runs on (the guest sees
its ports hang up and the agent waits for the next recorder, docs/agent.md). ``prepare`` leaves
placeholder socket inodes so that ``record`` can find the guest's CPU count from the
directory alone; ``record`` rebinds them.
"""
from __future__ import annotations

import errno
import grp
import os
import re
import socket
import stat
from dataclasses import dataclass
from typing import List, Optional
from xml.sax.saxutils import quoteattr

from vmtrace.errors import VmtraceError

CTL = "agent-ctl-path"
CPU = "trace-path-cpu%d"
TRANSPORTS = ("fifo", "socket")
QEMU_GROUPS = ("qemu", "libvirt-qemu", "kvm")
MAX_CPUS = 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_CPU_FILE = re.compile(r"^trace-path-cpu(\d+)(\.in|\.out)?\Z")


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


@dataclass
class GuestLayout:
    """A prepared guest directory: what QEMU needs and what the recorder opens."""

    name: str
    path: str
    cpus: int
    transport: str = "fifo"
    group: str = ""
    gid: int = -1

    # -- names -----------------------------------------------------------------------
    @property
    def ctl(self) -> str:
        """The chardev path of the control port (FIFOs add .in/.out to it)."""
        return os.path.join(self.path, CTL)

    def cpu(self, n: int) -> str:
        return os.path.join(self.path, CPU % n)

    def port_names(self) -> List[str]:
        return [CTL] + [CPU % n for n in range(self.cpus)]

    def files(self) -> List[str]:
        """Every file this layout puts in the directory."""
        if self.transport == "fifo":
            return [os.path.join(self.path, p + s) for p in self.port_names() for s in (".in", ".out")]
        return [os.path.join(self.path, p) for p in self.port_names()]

    # -- what QEMU and libvirt need ----------------------------------------------------
    def qemu_args(self, bus: str = "vmtvs0") -> List[str]:
        """QEMU options wiring one virtserialport per file pair, named as the agent expects."""
        args = ["-device", "virtio-serial-pci,id=%s" % bus]
        for nr, port in enumerate(self.port_names(), start=1):
            cid = "vmt%s%d" % (self.name.replace(".", "_").replace("-", "_")[:16], nr)
            path = os.path.join(self.path, port)
            if "," in path:
                raise VmtraceError("path %s contains ',', which QEMU options cannot carry" % path)
            if self.transport == "fifo":
                args += ["-chardev", "pipe,id=%s,path=%s" % (cid, path)]
            else:
                args += ["-chardev", "socket,id=%s,path=%s,reconnect=1" % (cid, path)]
            args += ["-device", "virtserialport,bus=%s.0,nr=%d,chardev=%s,name=%s" % (bus, nr, cid, port)]
        return args

    def libvirt_xml(self) -> str:
        """``<channel>`` elements to paste into the domain's ``<devices>``."""
        out = []
        for port in self.port_names():
            path = quoteattr(os.path.join(self.path, port))
            if self.transport == "fifo":
                out.append(
                    "<channel type='pipe'>\n  <source path=%s/>\n  <target type='virtio' name='%s'/>\n</channel>"
                    % (path, port)
                )
            else:
                out.append(
                    "<channel type='unix'>\n  <source mode='connect' path=%s>\n"
                    "    <reconnect enabled='yes' timeout='1'/>\n  </source>\n"
                    "  <target type='virtio' name='%s'/>\n</channel>" % (path, port)
                )
        return "\n".join(out) + "\n"

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
            kinds = set()
            for entry in os.listdir(dfd):
                m = _CPU_FILE.match(entry)
                if m:
                    cpus.add(int(m.group(1)))
                    kinds.add("fifo" if m.group(2) else "socket")
            if not cpus:
                raise VmtraceError("%s has no trace-path-cpuN ports; run vmtrace prepare %s first" % (path, name))
            if len(kinds) > 1:
                raise VmtraceError("%s mixes FIFOs and sockets; run vmtrace prepare again" % path)
            n = max(cpus) + 1
            if cpus != set(range(n)):
                raise VmtraceError("%s: trace-path-cpuN ports are not numbered 0..%d" % (path, n - 1))
            transport = kinds.pop()
            lay = cls(name=name, path=path, cpus=n, transport=transport, gid=st.st_gid)
            try:
                lay.group = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                lay.group = str(st.st_gid)
            for f in lay.files():
                _check_node(dfd, os.path.basename(f), transport, f)
            return lay
        finally:
            os.close(dfd)


def _check_node(dfd: int, leaf: str, transport: str, shown: str) -> os.stat_result:
    try:
        st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        raise VmtraceError("%s is missing; run vmtrace prepare again" % shown) from None
    want = stat.S_ISFIFO if transport == "fifo" else stat.S_ISSOCK
    if stat.S_ISLNK(st.st_mode):
        raise VmtraceError("%s is a symlink; refusing to follow it" % shown)
    if not want(st.st_mode):
        raise VmtraceError("%s is not a %s" % (shown, "FIFO" if transport == "fifo" else "socket"))
    if st.st_uid != os.geteuid():
        raise VmtraceError("%s is owned by uid %d, not by us; refusing to use it" % (shown, st.st_uid))
    return st


def _make_fifo(dfd: int, leaf: str, gid: int, shown: str) -> None:
    try:
        os.mkfifo(leaf, 0o600, dir_fd=dfd)
    except FileExistsError:
        _check_node(dfd, leaf, "fifo", shown)
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; O_NOFOLLOW:
    # the name was checked above but could be swapped for a link in between.
    fd = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise VmtraceError("%s is not a FIFO" % shown)
        os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o660)
    finally:
        os.close(fd)


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
    """Create (or check and repair) the guest's directory and its FIFOs or sockets.

    Idempotent: running it again on our own directory fixes modes and groups and
    removes ports of CPUs the guest no longer has, but anything we do not own, or any
    symlink, stops it with an error.
    """
    check_guest_name(name)
    if transport not in TRANSPORTS:
        raise VmtraceError("bad transport %r (use fifo or socket)" % transport)
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
        other = "socket" if transport == "fifo" else "fifo"
        for entry in os.listdir(dfd):
            m = _CPU_FILE.match(entry)
            is_ctl = entry in (CTL, CTL + ".in", CTL + ".out")
            if not (m or is_ctl):
                continue
            stale_kind = (m and ((m.group(2) is not None) != (transport == "fifo"))) or (
                is_ctl and ((entry != CTL) != (transport == "fifo"))
            )
            if (m and int(m.group(1)) >= cpus) or stale_kind:
                _check_node(dfd, entry, other if stale_kind else transport, os.path.join(path, entry))
                os.unlink(entry, dir_fd=dfd)
        for f in lay.files():
            leaf = os.path.basename(f)
            if transport == "fifo":
                _make_fifo(dfd, leaf, gid, f)
            else:
                bind_socket(dfd, leaf, gid, f).close()
        return lay
    finally:
        os.close(dfd)
