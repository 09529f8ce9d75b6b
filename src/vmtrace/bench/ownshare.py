"""What share of a collector's recording is the collector itself.

A collector that records its own wake-ups, page moves and allocations costs the traced
system twice: once to do them, once to record them, and the user's events are buried
under them. Loss and overhead do not show this; decoding the output does. We count the
events whose task is one of the collector's threads (their ids were taken once it was
ready) among all events it delivered.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from vmtrace.errors import VmtraceError
from vmtrace.tracefs import Tracefs


def ensure_metadata(outdir: Path, tf: Tracefs, cpus: Sequence[int]) -> None:
    """A collector that writes only pages (the seed-style one) gets the instance's
    metadata written beside them, so that its output decodes like the agent's."""
    if (outdir / "metadata" / "meta.json").is_file():
        return
    from vmtrace.agent import metadata
    from vmtrace.agent.stream import write_metadata_dir

    meta = metadata.meta(tf, list(cpus), [], tf.subbuf_size(), {"version": "bench peer"}, {})
    write_metadata_dir(str(outdir), metadata.collect(tf, meta, with_kallsyms=False))


def own_share(outdir: Path, tids: Sequence[int], tf: Tracefs, cpus: Sequence[int]) -> Optional[float]:
    """Fraction of the delivered events whose pid is one of ``tids`` (None: nothing to
    decode). Decoding errors count as no answer, not as a failed benchmark run."""
    import numpy as np

    import vmtrace

    if not any((outdir / ("cpu%d" % c)).is_file() and os.path.getsize(outdir / ("cpu%d" % c)) for c in cpus):
        return None
    try:
        ensure_metadata(outdir, tf, cpus)
        with vmtrace.open(str(outdir), keep_going=True) as trace:
            pids = trace.table().column("pid").to_numpy()
    except (VmtraceError, OSError):
        return None
    if not pids.size:
        return None
    return float(np.isin(pids, np.asarray(list(tids), dtype=pids.dtype)).mean())
