"""Exports of a decoded trace to formats other tools read (JSON lines, Parquet, ...).

Each format is one small module with a ``write_*`` function taking a
:class:`vmtrace.api.Trace`; the ``report`` command only chooses among them.
"""
from __future__ import annotations

__all__ = ["jsonl", "parquet"]
