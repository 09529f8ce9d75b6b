"""Exports: every output format of ``vmtrace report`` is one module here.

A module is an export when it defines ``FORMAT`` (an :class:`Export`) and
``write(source, out, selection)``, where ``source`` is any :mod:`vmtrace.source` Source
(a single trace or a session), ``out`` a path (or None for standard output where the
format allows it) and ``selection`` a :class:`vmtrace.source.Selection`. ``write``
returns a one-line summary for the user, or None. The CLI's ``--format`` choices are
the registry's names, so adding a format is adding one file (docs/internals.md).
Modules without ``FORMAT`` (the timeline model, the protobuf wire helpers) are shared
pieces, not formats.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, Iterable, Iterator, Optional

# The order formats are listed in; any other export found comes after, by name.
PREFERRED = ("text", "jsonl", "parquet", "perfetto", "chrome", "html")


@dataclass(frozen=True)
class Export:
    name: str
    help: str
    needs_file: bool = False      # binary or whole-file formats: -o is required


_registry: Optional[Dict[str, ModuleType]] = None


def registry() -> Dict[str, ModuleType]:
    """name -> export module, found by looking at this package's modules."""
    global _registry
    if _registry is None:
        found: Dict[str, ModuleType] = {}
        for info in pkgutil.iter_modules(__path__):
            mod = importlib.import_module("%s.%s" % (__name__, info.name))
            fmt = getattr(mod, "FORMAT", None)
            if isinstance(fmt, Export) and callable(getattr(mod, "write", None)):
                found[fmt.name] = mod
        order = [n for n in PREFERRED if n in found] + sorted(n for n in found if n not in PREFERRED)
        _registry = {n: found[n] for n in order}
    return _registry


def get(name: str) -> ModuleType:
    from vmtrace.errors import VmtraceError
    reg = registry()
    if name not in reg:
        raise VmtraceError("no export format %r (have: %s)" % (name, ", ".join(reg)))
    return reg[name]


class Tally:
    """Counts what an export consumed, for the one-line summary the CLI prints."""

    def __init__(self) -> None:
        self.events = 0
        self.lost = 0
        self.sources: set = set()

    def watch(self, events: Iterable[Any]) -> Iterator[Any]:
        from vmtrace.session import LOST, event_name
        for e in events:
            if event_name(e) == LOST:
                self.lost += 1
            else:
                self.events += 1
            self.sources.add(getattr(e, "source", ""))
            yield e

    def summary(self, path: str) -> str:
        k = len(self.sources)
        lost = " and %d lost-events marker%s" % (self.lost, "" if self.lost == 1 else "s") if self.lost else ""
        return "wrote %d events%s from %d source%s to %s" % (self.events, lost, k, "" if k == 1 else "s", path)


class Counted:
    """A Source whose events an export consumes are counted by ``tally``; everything
    else (identity, members, columns) is the source's own."""

    def __init__(self, source: Any, tally: Tally) -> None:
        self._source, self._tally = source, tally

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def events(self, **selection: Any) -> Iterator[Any]:
        return self._tally.watch(self._source.events(**selection))
