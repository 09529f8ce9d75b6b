"""Result documents: JSON on disk, a rich table on the terminal, a PNG bar chart.

A result document is a plain dict (JSON-ready) so that docs, CI and later comparisons
read the same file the table was printed from. Every document records the machine and
the command that produced it, because a figure without them cannot be checked.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from vmtrace.errors import VmtraceError

DEFAULT_DIR = Path("bench/results")


def machine_info() -> Dict[str, Any]:
    """Enough about the machine to tell whether two result files are comparable."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {
        "kernel": platform.release(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kb / 1048576, 1),
        "python": platform.python_version(),
        "virtualised": _virtualised(),
    }


def _virtualised() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " hypervisor" in f.read()
    except OSError:
        return False


def attach_context(doc: Dict[str, Any], argv: Optional[List[str]] = None) -> Dict[str, Any]:
    doc.setdefault("machine", machine_info())
    doc.setdefault("command", "vmtrace " + " ".join(argv if argv is not None else sys.argv[1:]))
    return doc


# -- files ---------------------------------------------------------------------------
def write_json(doc: Dict[str, Any], out_dir: Path, stem: str) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / (stem + ".json")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise VmtraceError("cannot write results to %s: %s" % (out_dir, exc.strerror))
    return path


def read_json(path: Path) -> Dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise VmtraceError("cannot read %s: %s" % (path, exc.strerror))
    except ValueError as exc:
        raise VmtraceError("%s: not a JSON result file (%s)" % (path, exc))
    if not isinstance(doc, dict) or "benchmark" not in doc:
        raise VmtraceError("%s: not a vmtrace benchmark result (no 'benchmark' key)" % path)
    return doc


# -- formatting ----------------------------------------------------------------------
def fmt_num(v: Optional[float], digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def fmt_bytes(v: Optional[float]) -> str:
    if v is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{int(v)} B"


def fmt_overhead(o: Optional[Dict[str, Optional[float]]]) -> str:
    if not o or o.get("median") is None:
        return "-"
    text = f"{o['median']:+.1f} %"
    if o.get("min") is not None and o.get("max") is not None:
        text += f" [{o['min']:+.1f}..{o['max']:+.1f}]"
    return text


def _med(s: Optional[Dict[str, Any]]) -> Optional[float]:
    return None if not s else s.get("median")


def overhead_rows(doc: Dict[str, Any]) -> Iterable[tuple]:
    """(workload, unit, collector, entry) in the order collectors were configured."""
    order = doc.get("params", {}).get("collectors") or []
    for wname, w in doc.get("workloads", {}).items():
        cols = w.get("collectors", {})
        for name in [n for n in order if n in cols] + [n for n in cols if n not in order]:
            yield wname, w.get("unit", "score"), name, cols[name]


# Columns of the overhead table, shared by the terminal and the Markdown form.
OVERHEAD_COLUMNS = ("workload", "collector", "score (median)", "min", "max", "overhead vs native [range]",
                    "CPU s", "CPU s/100MB", "bytes moved", "events lost", "own events")


def fmt_share(v: Optional[float]) -> str:
    return "-" if v is None else "%.2f %%" % (100 * v)


def _overhead_cells(name: str, e: Dict[str, Any]) -> List[str]:
    """Every cell after the workload's name, for one collector."""
    score = e.get("score") or {}
    return [name, fmt_num(score.get("median")), fmt_num(score.get("min")), fmt_num(score.get("max")),
            "reference" if name == "native" else fmt_overhead(e.get("overhead_pct")),
            fmt_num(_med(e.get("cpu_seconds")), 2), fmt_num(_med(e.get("cpu_per_100mb")), 2),
            fmt_bytes(_med(e.get("bytes"))), fmt_num(_med(e.get("lost"))), fmt_share(_med(e.get("own_share")))]


def overhead_table(doc: Dict[str, Any]):
    """A rich Table of an overhead document (one block of rows per workload)."""
    from rich.table import Table

    scenario = (doc.get("params", {}).get("scenario") or {}).get("name")
    table = Table(title="vmtrace bench overhead (%s%s)" % (doc.get("setting", "host"),
                                                          ", scenario %s" % scenario if scenario else ""))
    for head in OVERHEAD_COLUMNS:
        table.add_column(head, justify="left" if head in ("workload", "collector") else "right", no_wrap=True)
    last = None
    for wname, unit, name, e in overhead_rows(doc):
        if last is not None and wname != last:
            table.add_section()
        table.add_row(wname if wname != last else "", *_overhead_cells(name, e))
        last = wname
    return table


def overhead_markdown(doc: Dict[str, Any]) -> str:
    """The same table as Markdown, for docs/benchmarks.md and the README."""
    lines = ["| " + " | ".join(OVERHEAD_COLUMNS) + " |",
             "|---|---|" + "---:|" * (len(OVERHEAD_COLUMNS) - 2)]
    for wname, unit, name, e in overhead_rows(doc):
        lines.append("| " + " | ".join([wname, *_overhead_cells(name, e)]) + " |")
    return "\n".join(lines) + "\n"


def overhead_png(doc: Dict[str, Any], path: Path) -> Path:
    """Bars of the median score per collector, error bars from min to max, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(doc.get("workloads", {}))
    if not workloads:
        raise VmtraceError("no workloads in the result document: nothing to plot")
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, wname in zip(axes[0], workloads):
        rows = [(n, e) for w, _u, n, e in overhead_rows(doc) if w == wname]
        names = [n for n, _ in rows]
        med = [e["score"]["median"] for _, e in rows]
        lo = [e["score"]["median"] - e["score"]["min"] for _, e in rows]
        hi = [e["score"]["max"] - e["score"]["median"] for _, e in rows]
        colors = ["#999999" if n in ("off", "native") else ("#2a7ab9" if n == "vmtrace" else "#d98b2b")
                  for n in names]
        bars = ax.bar(names, med, yerr=[lo, hi], capsize=4, color=colors)
        for bar, (n, e) in zip(bars, rows):
            o = e.get("overhead_pct")
            if n not in ("off", "native") and o and o.get("median") is not None:
                ax.annotate(f"{o['median']:+.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_title(wname)
        ax.set_ylabel(doc["workloads"][wname].get("unit", "score"))
        ax.tick_params(axis="x", rotation=30)
    p = doc.get("params", {})
    fig.suptitle("workload score per collector (median, min-max; %s s x %s reps)" % (p.get("seconds"), p.get("reps")),
                 fontsize=10)
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    """Write a finished chart as PNG; a path we cannot write is a one-line error."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise VmtraceError("cannot write %s: %s" % (path, exc.strerror))
    finally:
        plt.close(fig)
    return path


# -- generic documents (decode, drain) ------------------------------------------------
SAMPLE_KEYS = ("samples", "seconds", "times", "scores", "values")


def _sample_list(entry: Dict[str, Any]) -> Optional[List[float]]:
    for key in SAMPLE_KEYS:
        v = entry.get(key)
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            return [float(x) for x in v]
    return None


def generic_rows(doc: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Find the per-peer entries in a decode/drain document.

    Those modules are written by others and return a dict; we accept either
    ``{"results": {name: {...}}}`` or ``{name: {...}, ...}`` at the top, and treat every
    mapping of scalars (and sample lists) as one row. That keeps the output style the
    same without forcing one schema on every benchmark.
    """
    src = doc.get("results") if isinstance(doc.get("results"), dict) else doc
    return {k: v for k, v in src.items() if isinstance(v, dict) and k not in ("machine", "params")}


def generic_table(doc: Dict[str, Any], title: str):
    from rich.table import Table

    rows = generic_rows(doc)
    cols: List[str] = []
    for entry in rows.values():
        for k, v in entry.items():
            if k not in cols and (isinstance(v, (int, float, str)) or _sample_list({k: v})):
                cols.append(k)
    table = Table(title=title)
    table.add_column("peer")
    for c in cols:
        table.add_column(c, justify="right")
    for name, entry in rows.items():
        cells = []
        for c in cols:
            v = entry.get(c)
            samples = _sample_list({c: v}) if isinstance(v, list) else None
            if samples:
                cells.append("%s [%s..%s]" % (fmt_num(statistics.median(samples), 3), fmt_num(min(samples), 3),
                                              fmt_num(max(samples), 3)))
            elif isinstance(v, float):
                cells.append(fmt_num(v, 3))
            elif isinstance(v, int):
                cells.append(fmt_num(v))
            else:
                cells.append("-" if v is None else str(v))
        table.add_row(name, *cells)
    return table


def generic_png(doc: Dict[str, Any], path: Path, title: str) -> Optional[Path]:
    """Median bars with min-max error bars for every row that carries a sample list."""
    rows = [(n, _sample_list(e)) for n, e in generic_rows(doc).items()]
    rows = [(n, s) for n, s in rows if s]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = [statistics.median(s) for _, s in rows]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(rows)), 4))
    ax.bar([n for n, _ in rows], med, capsize=4,
           yerr=[[m - min(s) for m, (_, s) in zip(med, rows)], [max(s) - m for m, (_, s) in zip(med, rows)]])
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    return _save_figure(fig, path)
