"""A transport that exists only in the tests: proof that a new one is one file.

Its nodes are plain files (``NAME.toy``), its chardev QEMU's ``file`` backend. It cannot
record, and does not need to: what is tested is that ``vmtrace prepare --transport toy``,
``GuestLayout.open`` and a switch of transports pick it up from the registry alone.
Importing this module registers it, as a real one is registered by its line in
``vmtrace.host.transport.TRANSPORTS``.
"""
from __future__ import annotations

import errno
import os
import stat

from vmtrace.errors import VmtraceError
from vmtrace.host.transport import TRANSPORTS, Transport
from vmtrace.host.transport.base import share_with_group


class ToyTransport(Transport):
    name = "toy"
    suffixes = (".toy",)
    node_kind = "toy file"

    def is_node(self, mode: int) -> bool:
        return stat.S_ISREG(mode)

    def make_node(self, dfd: int, leaf: str, gid: int, shown: str) -> None:
        try:
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise VmtraceError("%s is a symlink; refusing to follow it" % shown) from None
            raise
        share_with_group(fd, gid)

    def chardev(self, cid: str, path: str) -> str:
        return "file,id=%s,path=%s.toy" % (cid, path)

    def channel(self, path_attr: str, port: str) -> str:
        return "<channel type='file'>\n  <source path=%s/>\n  <target type='virtio' name='%s'/>\n</channel>" % (
            path_attr, port)


def register() -> None:
    TRANSPORTS["toy"] = ToyTransport


register()
