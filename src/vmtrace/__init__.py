"""vmtrace: low-overhead ftrace collection from virtual machines.

``vmtrace.open(path)`` is the Python entry point for reading traces (trace.dat v6/v7,
an agent's raw output directory or ``-o`` stream, or a recording session): it returns a
Source (:mod:`vmtrace.source`). It is imported lazily so that
``import vmtrace.agent`` in a guest never needs numpy.
"""
from __future__ import annotations

__version__ = "0.1.0"


def open(path, **kwargs):  # noqa: A001 - mirrors builtins.open on purpose
    """Open any recorded input as a Source; see :func:`vmtrace.source.open`."""
    from vmtrace.source import open as _open

    return _open(path, **kwargs)
