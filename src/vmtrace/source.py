"""One shape for every trace: a :class:`Source`.

A trace.dat, a raw directory, an agent's ``-o`` stream and a recording session (host
and guests merged on the host's clock) used to be two kinds of object, so every command
and export resolved its input itself and a session could not be filtered. Now
:func:`open` returns a Source for any of them, and everything downstream (``vmtrace
report`` in every format, ``check``, ``sql``, the timeline, the demo) takes one.

A Source has
- an identity: ``name`` (what a person calls it: a guest's name, ``host``, a hostname,
  the session directory), ``kind`` (``trace.dat``, ``raw``, ``stream``, ``session``) and
  ``clock`` (the clock its timestamps are on);
- ``members()``: the single traces it is made of (a single trace is its own member);
- the same five readers, all taking the same selection keywords (:class:`Selection`):
  ``events()`` in time order, ``table()`` (pyarrow), ``stats()``, ``text_blocks()``
  (what ``trace-cmd report`` prints) and ``check_selection()``, which refuses a
  selection that names nothing in it;
- ``close()``, and the context-manager protocol.

:class:`vmtrace.api.Trace` implements it for single traces and
:class:`vmtrace.session.SessionSource` for sessions.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Protocol, Sequence, Tuple, Union

from vmtrace.errors import VmtraceError

KINDS = ("trace.dat", "raw", "stream", "session")


@dataclass(frozen=True)
class Selection:
    """What part of a source a reader returns. ``None`` means everything.

    ``events``: "system", "system:event", bare names or globs; ``cpus``: CPU numbers (of
    every member, for a session); ``sources``: member names (a session's ``host`` and
    guests); ``start``/``end``: inclusive timestamps on the source's own timeline (a
    session's is the host's clock), integers in ns or float seconds.
    """

    events: Optional[Tuple[str, ...]] = None
    cpus: Optional[Tuple[int, ...]] = None
    sources: Optional[Tuple[str, ...]] = None
    start: Union[int, float, None] = None
    end: Union[int, float, None] = None

    def kwargs(self) -> Dict[str, Any]:
        """The selection as the keyword arguments every Source reader takes."""
        return {"events": list(self.events) if self.events is not None else None,
                "cpus": list(self.cpus) if self.cpus is not None else None,
                "sources": list(self.sources) if self.sources is not None else None,
                "start": self.start, "end": self.end}

    @property
    def everything(self) -> bool:
        return all(v is None for v in (self.events, self.cpus, self.sources, self.start, self.end))


EVERYTHING = Selection()


class Source(Protocol):
    """The interface (documentation; implementations do not inherit from it)."""

    name: str
    kind: str
    clock: str

    def members(self) -> Sequence["Source"]: ...

    def events(self, **selection: Any) -> Iterator[Any]: ...

    def table(self, **selection: Any) -> Any: ...

    def stats(self, **selection: Any) -> Dict[str, Any]: ...

    def text_blocks(self, **selection: Any) -> Iterator[bytes]: ...

    def check_selection(self, **selection: Any) -> None: ...

    def close(self) -> None: ...


def is_session_dir(path: Union[str, os.PathLike]) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "session.json"))


def open(path: Union[str, os.PathLike], *, keep_going: bool = False,  # noqa: A001
         formats: Optional[str] = None) -> Any:
    """Any recorded input as a Source: a session directory, a trace.dat (v6/v7), a raw
    directory, an ``-o`` stream, or (with ``formats``, a copy of the guest's tracefs) a
    seed agent's directory of cpuN files. Decided by content, never by file name."""
    p = os.fspath(path)
    if is_session_dir(p):
        if formats:
            raise VmtraceError(f"{p}: a session carries its own formats; --formats is for a seed agent's cpuN files")
        from vmtrace.session import SessionSource
        return SessionSource(p, keep_going=keep_going)
    from vmtrace import api
    if formats:
        from vmtrace.seeddir import open_seed_dir
        return open_seed_dir(p, formats, keep_going=keep_going)
    return api.open(p, keep_going=keep_going)


@contextlib.contextmanager
def opened(x: Any, **kwargs: Any) -> Iterator[Any]:
    """``x`` as a Source for the length of a ``with`` block: a path is opened (and closed
    at the end), a Source is used as it is."""
    if isinstance(x, (str, os.PathLike)):
        with open(x, **kwargs) as src:
            yield src
    else:
        yield x


def is_source(x: Any) -> bool:
    """Whether ``x`` implements the Source interface (not merely an iterable of events)."""
    return all(callable(getattr(x, m, None)) for m in ("members", "events", "text_blocks", "stats"))
