"""Regenerate the small committed trace.dat fixtures (run as root, with trace-cmd).

    .venv/bin/python tests/data/tracedat_make_fixtures.py

Records sched, timer and irq events with a small buffer (so some events are dropped)
from a private tracefs instance, keeps the first pages of each CPU and only the formats
of those systems (no kallsyms), and writes them with vmtrace's writer as v7/zstd and v6,
plus trace-cmd's own report of the v7 file as the expected text. The fixtures let the
reader, the fuzz test and the renderer's tests run where there is no tracefs or trace-cmd.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import realtrace  # noqa: E402
from vmtrace.format.tracedat_read import open_tracedat  # noqa: E402
from vmtrace.format.tracedat_write import write_tracedat  # noqa: E402
from vmtrace.sources import source_metadata  # noqa: E402

KEEP_SYSTEMS = {"sched", "timer", "irq"}
PAGES_PER_CPU = 6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        rec = realtrace.record_tracedat(t / "rec.dat", events=sorted(KEEP_SYSTEMS), buffer_kb=64)
        with open_tracedat(rec) as src:
            md = {k: v for k, v in source_metadata(src).items()
                  if not k.startswith("events/") or k.split("/")[1] in KEEP_SYSTEMS | {"ftrace"}}
            md.pop("kallsyms", None)
            buf = max(src.buffers, key=lambda b: sum(c.size for c in b.cpus))
            files = {}
            for c in buf.cpus:
                path = t / f"cpu{c.cpu}"
                with open(path, "wb") as f:
                    for i, page in enumerate(c.pages()):
                        if i == PAGES_PER_CPU:
                            break
                        f.write(page)
                files[c.cpu] = str(path)
            opts = {"trace_clock": src.options["trace_clock"], "cpustat": src.options["cpustat"],
                    "uname": "Linux fixture " + src.options.get("kernel", "unknown"),
                    "version": "vmtrace fixture"}
        write_tracedat(HERE / "tracedat_small_v7.dat", md, files, options=opts)
        write_tracedat(HERE / "tracedat_small_v6.dat", md, files, options=opts, version=6)
        (HERE / "tracedat_small.report.txt").write_text(
            realtrace.trace_cmd_report(HERE / "tracedat_small_v7.dat"))


if __name__ == "__main__":
    main()
