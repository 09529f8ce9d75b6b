"""The transports a guest's ports can use, found by name (``vmtrace prepare --transport``).

Adding one is one module with a :class:`Transport` subclass and one line here (see
docs/internals.md, "Adding a transport"); nothing else in the recorder names them.
"""
from __future__ import annotations

from typing import Dict, List, Type

from vmtrace.errors import VmtraceError
from vmtrace.host.transport.base import Port, Ports, Transport
from vmtrace.host.transport.fifo import FifoTransport
from vmtrace.host.transport.unix import UnixTransport

__all__ = ["TRANSPORTS", "Port", "Ports", "Transport", "get_transport", "transport_names"]

# name -> class, in the order `vmtrace prepare --help` lists them
TRANSPORTS: Dict[str, Type[Transport]] = {"fifo": FifoTransport, "socket": UnixTransport}


def transport_names() -> List[str]:
    return list(TRANSPORTS)


def get_transport(name: str) -> Transport:
    """The transport called ``name``; an unknown name is the user's error, said plainly."""
    cls = TRANSPORTS.get(name)
    if cls is None:
        names = transport_names()
        raise VmtraceError("bad transport %r (use %s or %s)" % (name, ", ".join(names[:-1]), names[-1]))
    return cls()
