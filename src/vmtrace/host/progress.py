"""Live progress and the final summary of a recording, as rich tables.

Kept apart from the recording so it stays usable without a terminal (the demo
and tests call it with no progress at all), and so the rates are computed in one place:
MB/s is the change in bytes written since the previous refresh.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

from rich.table import Table


def _mb(n: float) -> str:
    return "%.1f" % (n / 1e6)


class Progress:
    """Callable for ``Recording(progress=...)``: renders into a rich ``Live``."""

    def __init__(self, live: Any):
        self.live = live
        self._last: Dict[Tuple[str, int], Tuple[float, int]] = {}

    def __call__(self, session: Any) -> None:
        self.live.update(self.table(session))

    def table(self, session: Any) -> Table:
        now = time.monotonic()
        elapsed = (time.monotonic_ns() - session.started_ns) / 1e9 if session.started_ns else 0.0
        t = Table(title="vmtrace record: %.0f s -> %s" % (elapsed, session.outdir), expand=False)
        for col in ("guest", "cpu", "MB", "MB/s", "pages", "lost events", "dropped pages", "state"):
            t.add_column(col, justify="left" if col in ("guest", "state") else "right")
        for g in session.guests.values():
            agent = g.agent_stats if isinstance(g.agent_stats, dict) else {}
            for cpu, s in sorted(g.streams.items()):
                st = s.stats()
                key = (g.name, cpu)
                t0, b0 = self._last.get(key, (now, st["written"]))
                rate = (st["written"] - b0) / (now - t0) if now > t0 else 0.0
                self._last[key] = (now, st["written"])
                a = agent.get(str(cpu))
                lost = a.get("lost_events", "") if isinstance(a, dict) else ""
                state = g.state if not st["error"] else "error: %s" % st["error"]
                t.add_row(g.name, str(cpu), _mb(st["written"]), "%.1f" % (rate / 1e6), str(st["pages"]),
                          str(lost), str(st["dropped_pages"]), state)
        return t


def summary_table(doc: Dict[str, Any]) -> Table:
    """The end-of-recording table: one row per guest, totals over its CPUs."""
    t = Table(title="recorded (%s)" % (doc.get("stop_reason") or "done"))
    for col in ("guest", "cpus", "MB", "pages", "lost events", "dropped pages", "probes", "file"):
        t.add_column(col, justify="left" if col in ("guest", "file") else "right")
    entries = list(doc.get("guests", {}).items())
    if doc.get("host"):
        entries.append(("(host)", doc["host"]))
    for name, e in entries:
        host = e["stats"]["host"]
        agent = e["stats"].get("agent") or {}
        agent = agent.get("cpus", agent) if isinstance(agent, dict) else {}
        written = sum(s["written"] for s in host.values())
        pages = sum(s["pages"] for s in host.values())
        dropped = sum(s["dropped_pages"] for s in host.values())
        lost = sum(a["lost_events"] for a in agent.values() if isinstance(a, dict) and type(a.get("lost_events")) is int)
        t.add_row(name, str(e["cpus"]), _mb(written), str(pages), str(lost), str(dropped),
                  str(len(e["probes"])), e.get("file") or ("(raw) " + str(e.get("raw"))))
    return t
