"""The one exception type users see.

Everything that can go wrong because of *input* (a file, a guest, a command line) is
raised as a VmtraceError whose text is a single line naming where the problem is. The
CLI prints it as ``vmtrace: error: ...`` and exits with status 2; anything else reaching
the top is a bug in vmtrace. Standard library only: the guest agent imports this.
"""
from __future__ import annotations

from typing import Optional


class VmtraceError(Exception):
    """A problem with input or environment, explained in one line."""


class FormatError(VmtraceError):
    """Bytes that do not parse: names the source and, when known, the byte offset.

    Guest data is untrusted, so decoders raise this instead of IndexError, struct.error
    or MemoryError; ``--keep-going`` modes catch it per unit (page, section) and count.
    """

    def __init__(self, what: str, *, source: Optional[str] = None, offset: Optional[int] = None):
        self.what = what
        self.source = source
        self.offset = offset
        super().__init__(self._text())

    def _text(self) -> str:
        parts = []
        if self.source:
            parts.append(str(self.source))
        if self.offset is not None:
            parts.append(f"offset {self.offset}")
        parts.append(self.what)
        return ": ".join(parts)

    def at(self, *, source: Optional[str] = None, offset: Optional[int] = None) -> "FormatError":
        """Return a copy located in an outer context (a file name, an absolute offset)."""
        return FormatError(
            self.what,
            source=source if source is not None else self.source,
            offset=offset if offset is not None else self.offset,
        )
