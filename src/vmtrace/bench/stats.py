"""Small, dependency-free statistics for benchmark samples.

Repetitions on a shared machine are few (2-5) and noisy, so we report the median with
the full range instead of a mean and standard deviation that would pretend to a
normality we do not have.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from vmtrace.errors import VmtraceError


@dataclass(frozen=True)
class Summary:
    """Median and range of one set of samples; ``spread_pct`` is (max-min)/median."""

    n: int
    median: float
    min: float
    max: float

    @property
    def spread_pct(self) -> Optional[float]:
        if self.median == 0:
            return None
        return (self.max - self.min) / abs(self.median) * 100.0

    def as_dict(self) -> Dict[str, Optional[float]]:
        return {"n": self.n, "median": self.median, "min": self.min, "max": self.max,
                "spread_pct": self.spread_pct}


def summarize(samples: Sequence[float]) -> Summary:
    """Summarise samples; an empty list is a caller's bug made visible as one line."""
    values = [float(v) for v in samples]
    if not values:
        raise VmtraceError("no samples to summarise")
    return Summary(n=len(values), median=statistics.median(values), min=min(values), max=max(values))


def overhead_pct(score: float, native: float) -> float:
    """The seed's figure: ``(1 - score / native) * 100``.

    Positive means the collector slowed the workload down relative to ftrace alone;
    negative means it ran faster (noise, or a collector that frees the buffer).
    """
    if native <= 0:
        raise VmtraceError("native score must be positive to compute an overhead (got %r)" % native)
    return (1.0 - float(score) / float(native)) * 100.0


def paired_overheads(scores: Sequence[float], native: Sequence[float]) -> list:
    """Overhead of each repetition against the native run of the *same* repetition.

    Collectors are alternated within a repetition, so a pair shares the machine's state
    at that moment (other tenants, thermal, page cache); pairing removes that drift from
    the range we report. Unpaired leftovers (a failed run) are ignored.
    """
    return [overhead_pct(s, n) for s, n in zip(scores, native)]


def overhead_summary(scores: Sequence[float], native: Sequence[float]) -> Dict[str, Optional[float]]:
    """Overhead of the medians, with the min/max of the per-repetition overheads."""
    med = overhead_pct(statistics.median(scores), statistics.median(native))
    pairs = paired_overheads(scores, native)
    return {"median": med, "min": min(pairs) if pairs else None, "max": max(pairs) if pairs else None}
