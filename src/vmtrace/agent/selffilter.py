"""Keep the agent's own activity out of the recording, at a price the workload does not pay.

Why event filters and not the kernel's pid lists. ``set_event_notrace_pid`` (Linux 5.8+)
would be the obvious tool, but any pid list makes the kernel look up the previous and
next task of every context switch and wake-up in it: measured on the development machine
(pingpong pinned to CPU 0, sched+timer+kmem, 4 MB per CPU), one notrace pid cost the
workload 9-10 % of its score, run after run, with no reader at all. A filter
``common_pid != N`` on the same events cost nothing measurable on kmem and about 2 % on
all three systems; on every system but ``sched`` it stays within the noise.

What is left out: every enabled event whose task is one of our threads, except
- ``sched`` events: a switch to or from a pump, or its wake-up, is how a user sees the
  agent take a CPU; hiding it would make the workload's gaps unexplained;
- ``ftrace`` events: our own trace_marker lines (start/stop orders, time probes) must be
  recorded, they are how the host places the guest on its clock.
A user's own filter on an event (set before the agent, or by a configure's ``-f``) is
kept and combined with ours; at exit every event gets back the filter it had before the
agent started, after the configure's own settings were undone.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

from vmtrace.errors import VmtraceError
from vmtrace.tracefs import Tracefs

KEEP_SYSTEMS = ("sched", "ftrace")
NO_FILTER = "none"   # what an event's filter file says when it has none


def pid_exclusion(tids: Sequence[int]) -> str:
    """A filter expression true for every task but ``tids``; runs of consecutive ids
    (threads started one after the other) become one range, to keep it short."""
    runs: List[Tuple[int, int]] = []
    for t in sorted(set(int(t) for t in tids)):
        if runs and t == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    parts = ["common_pid != %d" % a if a == b else "(common_pid < %d || common_pid > %d)" % (a, b)
             for a, b in runs]
    return " && ".join(parts)


class SelfFilter:
    """Adds our exclusion to the filters of the enabled events, and takes it away again."""

    def __init__(self, tf: Tracefs, tids: Sequence[int]):
        self.tf = tf
        self.tids = sorted(set(int(t) for t in tids))
        self.expr = pid_exclusion(self.tids)
        self.saved: Dict[Tuple[str, str], str] = {}    # the event's filter before we came
        self._base: Dict[Tuple[str, str], str] = {}    # the filter ours is combined with
        self._written: Dict[Tuple[str, str], str] = {}  # what we last wrote
        self.events_filtered = 0

    def _path(self, system: str, event: str) -> str:
        return "events/%s/%s/filter" % (system, event)

    def apply(self, enabled: Iterable[str]) -> List[str]:
        """Filter every enabled "system:event" outside :data:`KEEP_SYSTEMS`; return the
        problems (one line each) for events the kernel would not filter."""
        problems = []
        for spec in enabled:
            system, _, event = spec.partition(":")
            if system in KEEP_SYSTEMS or not event:
                continue
            key = (system, event)
            try:
                current = self.tf.read(self._path(system, event)).strip()
                if key not in self.saved:
                    self.saved[key] = current
                # A filter set since we last wrote (a configure's -f) is the user's new
                # base; otherwise keep combining with the one we saw.
                if key not in self._base or current != self._written.get(key):
                    self._base[key] = current
                base = self._base[key]
                want = self.expr if base == NO_FILTER else "(%s) && %s" % (base, self.expr)
                if current != want:
                    self.tf.write(self._path(system, event), want)
                self._written[key] = self.tf.read(self._path(system, event)).strip()
            except VmtraceError as exc:
                problems.append(str(exc))
        self.events_filtered = len(self.saved)
        return problems

    def restore(self) -> List[str]:
        problems = []
        for (system, event), text in self.saved.items():
            try:
                self.tf.write(self._path(system, event), "0" if text == NO_FILTER else text)
            except VmtraceError as exc:
                problems.append(str(exc))
        self.saved, self._base, self._written = {}, {}, {}
        return problems
