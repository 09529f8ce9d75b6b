"""`vmtrace report FILE`: print a trace like `trace-cmd report`, or export it.

Thin: opening and decoding is :mod:`vmtrace.api`, text is :mod:`vmtrace.format.render`,
JSON lines, Parquet and the Perfetto traces are :mod:`vmtrace.export`. What lives here
is option handling and the trace-cmd conventions of which buffers are printed and how.
"""
from __future__ import annotations

import heapq
import os
import shutil
import stat
import sys
from typing import Any, Iterator, Optional

import click

from vmtrace.errors import VmtraceError


def _cpu_list(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    from vmtrace.tracefs import parse_cpu_list
    try:
        return parse_cpu_list(text)
    except (ValueError, VmtraceError):
        raise VmtraceError(f"--cpu: not a CPU list: {text!r} (example: 0,2-3)") from None


def _events(text: Optional[str]) -> Optional[list[str]]:
    if not text:
        return None
    return [e.strip() for e in text.split(",") if e.strip()]


def _seconds(text: Optional[str], opt: str) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(round(float(text) * 1e9))
    except ValueError:
        raise VmtraceError(f"{opt}: not a number of seconds: {text!r}") from None


# What --formats takes from a copy of the guest's tracefs (names as in the raw layout).
_FORMAT_FILES = ("header_page", "header_event", "saved_cmdlines", "printk_formats", "kallsyms")
_MAX_FORMAT_FILE = 64 << 20
_NEEDS_OUTPUT = ("parquet", "perfetto", "chrome")     # binary or whole-file formats


def _seed_dir_view(path: str, formats: str, tmp: str) -> str:
    """A raw directory (docs/internals.md layout) made of a seed agent's cpuN files
    and a tracefs copy, so the normal reader opens it: the CPU files are linked, the
    metadata is copied through the raw-directory writer (which validates every name)."""
    from vmtrace.format.rawdir import write_metadata
    import re
    src = os.path.abspath(path)
    if not os.path.isdir(src):
        raise VmtraceError(f"{path}: --formats needs a directory of cpuN files")
    md: dict[str, bytes] = {}
    for name in _FORMAT_FILES:
        # tracefs keeps header_page/header_event under events/; copies may flatten them
        for p in (os.path.join(formats, name), os.path.join(formats, "events", name)):
            if os.path.isfile(p):
                md[name] = _read_small(p)
                break
    if "header_page" not in md or "header_event" not in md:
        raise VmtraceError(f"{formats}: no header_page/header_event (copy them from the guest's tracefs)")
    evroot = os.path.join(formats, "events")
    if os.path.isdir(evroot):
        for system in sorted(os.listdir(evroot)):
            sdir = os.path.join(evroot, system)
            if not os.path.isdir(sdir) or not re.fullmatch(r"[A-Za-z0-9_]+", system):
                continue
            for ev in sorted(os.listdir(sdir)):
                f = os.path.join(sdir, ev, "format")
                if re.fullmatch(r"[A-Za-z0-9_.-]+", ev) and os.path.isfile(f):
                    md[f"events/{system}/{ev}/format"] = _read_small(f)
    write_metadata(tmp, md)
    n = 0
    for entry in sorted(os.listdir(src)):
        if not re.fullmatch(r"cpu\d+", entry):
            continue
        st = os.lstat(os.path.join(src, entry))
        if stat.S_ISLNK(st.st_mode):
            raise VmtraceError(f"{path}: {entry} is a symbolic link; refusing to follow it")
        if not stat.S_ISREG(st.st_mode):
            continue
        # The raw-directory reader follows no symlink, so the view holds the file
        # itself: a hard link, or a copy when the private directory is elsewhere.
        try:
            os.link(os.path.join(src, entry), os.path.join(tmp, entry), follow_symlinks=False)
        except OSError:
            shutil.copyfile(os.path.join(src, entry), os.path.join(tmp, entry), follow_symlinks=False)
        n += 1
    if not n:
        raise VmtraceError(f"{path}: no cpuN files")
    return tmp


def _read_small(p: str) -> bytes:
    with open(p, "rb") as f:
        data = f.read(_MAX_FORMAT_FILE + 1)
    if len(data) > _MAX_FORMAT_FILE:
        raise VmtraceError(f"{p}: larger than {_MAX_FORMAT_FILE} bytes, not a tracefs file")
    return data


def _open(path: str, formats: Optional[str], keep_going: bool, tmp: str) -> Any:
    from vmtrace import api
    if formats:
        return api.open(_seed_dir_view(path, formats, tmp), keep_going=keep_going)
    return api.open(path, keep_going=keep_going)


def _buffers_with_data(trace: Any) -> list[Any]:
    return [b for b in trace.source.buffers if any(c.size for c in b.cpus)]


def text_lines(trace: Any, *, cpus=None, events=None, start=None, end=None) -> Iterator[str]:
    """Every line trace-cmd report prints on stdout, in order."""
    from vmtrace.format.render import TextRenderer, header_lines
    yield from header_lines(trace.source.nr_cpus or len(trace.cpus()))
    bufs = _buffers_with_data(trace)
    if not bufs:
        return
    r = TextRenderer(trace.metadata, long_size=trace.source.long_size)
    if len(bufs) == 1:
        b = bufs[0]
        prefix = f"{b.name}: " if b.name else ""
        yield from r.lines(trace.events(cpus=cpus, events=events, start=start, end=end,
                                        buffer=b.name), prefix)
        return
    # several buffers: trace-cmd merges them by time, each line naming its buffer
    streams = []
    for k, b in enumerate(bufs):
        prefix = f"{b.name}: " if b.name else ""
        it = trace.events(cpus=cpus, events=events, start=start, end=end, buffer=b.name)
        streams.append(((ev.ts, k, i, ev, prefix) for i, ev in enumerate(it)))
    merged = heapq.merge(*streams, key=lambda t: (t[0], t[1], t[2]))
    # lines() handles one prefix; feed it one item at a time per buffer
    for ts, k, i, ev, prefix in merged:
        yield from r.lines((ev,), prefix)


def text_blocks(trace: Any, *, cpus=None, events=None, start=None, end=None,
                fast: bool = True) -> Iterator[bytes]:
    """The same text as :func:`text_lines`, UTF-8 encoded, in blocks of whole lines (each
    ending in a newline). Unfiltered reports (``--cpu`` allowed) of one buffer go through
    the bulk renderer (:mod:`vmtrace.format.fastrender`); anything else line by line."""
    bufs = _buffers_with_data(trace)
    if fast and len(bufs) == 1 and events is None and start is None and end is None:
        from vmtrace.format import fastrender
        if fastrender.supported(trace):
            from vmtrace.format.render import header_lines
            yield ("\n".join(header_lines(trace.source.nr_cpus or len(trace.cpus()))) + "\n").encode()
            yield from fastrender.report_blocks(trace, bufs[0], cpus)
            return
    buf = []
    for line in text_lines(trace, cpus=cpus, events=events, start=start, end=end):
        buf.append(line)
        if len(buf) >= 4096:
            buf.append("")
            yield "\n".join(buf).encode("utf-8", "surrogateescape")
            buf = []
    if buf:
        buf.append("")
        yield "\n".join(buf).encode("utf-8", "surrogateescape")


def _stats(trace: Any, out) -> None:
    from rich.console import Console
    from rich.table import Table
    st = trace.stats()
    con = Console(file=out, width=100)
    t = Table(title=f"{trace.name}: per CPU")
    for col in ("cpu", "events", "pages", "lost", "lost (unknown count)", "skipped pages"):
        t.add_column(col, justify="right")
    for cpu, s in sorted(st["cpus"].items()):
        t.add_row(str(cpu), str(s["events"]), str(s["pages"]), str(s["lost"]),
                  str(s["lost_unknown"]), str(s["problems"]))
    t.add_row("all", str(st["events"]), "", str(st["lost"]), str(st["lost_unknown"]), "")
    con.print(t)
    e = Table(title="per event")
    e.add_column("event")
    e.add_column("count", justify="right")
    for name, n in st["per_event"].items():
        e.add_row(name, str(n))
    con.print(e)


def _write_text(trace: Any, out: Optional[str], **sel: Any) -> None:
    """Text report to ``out`` or stdout, encoded and written in large blocks."""
    if out:
        f = open(out, "wb")
    else:
        sys.stdout.flush()
        f = getattr(sys.stdout, "buffer", None)
    if f is None:       # a text-only stdout (tests capturing output)
        for block in text_blocks(trace, **sel):
            sys.stdout.write(block.decode("utf-8", "surrogateescape"))
        sys.stdout.flush()
        return
    try:
        for block in text_blocks(trace, **sel):
            f.write(block)
        f.flush()
    finally:
        if out:
            f.close()


@click.command("report")
@click.argument("file", type=click.Path(exists=False, dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl", "parquet", "perfetto", "chrome"]),
              default="text", show_default=True,
              help="text is identical to `trace-cmd report`; perfetto (protobuf, e.g. -o "
                   "x.perfetto-trace) and chrome (JSON) open in https://ui.perfetto.dev.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--events", help="Comma-separated system or system:event (globs allowed).")
@click.option("--cpu", "cpu", help="CPUs to show, e.g. 0,2-3.")
@click.option("--start", help="First timestamp to show, in seconds (as printed).")
@click.option("--end", help="Last timestamp to show, in seconds (as printed).")
@click.option("--stats", is_flag=True, help="Per-CPU and per-event counts and lost events.")
@click.option("--keep-going", is_flag=True, help="Skip corrupt pages, count them, report the rest.")
@click.option("--formats", type=click.Path(file_okay=False), help="Guest tracefs copy (events/, header_page, header_event) for a raw directory without metadata.")
@click.option("--html", "html", type=click.Path(dir_okay=False), help="Also write a self-contained timeline page here.")
def command(file: str, fmt: str, out: Optional[str], events: Optional[str], cpu: Optional[str],
            start: Optional[str], end: Optional[str], stats: bool, keep_going: bool,
            formats: Optional[str], html: Optional[str]) -> None:
    """Decode a trace.dat, raw directory or -o stream and print it like `trace-cmd report`.

    A session directory from `vmtrace record --host-events` prints host and guests
    interleaved on the host's clock, each line tagged with its source.
    """
    if fmt in _NEEDS_OUTPUT and not out:
        raise VmtraceError(f"--format {fmt} needs -o FILE")
    from vmtrace.merge import is_session_dir
    if is_session_dir(file):
        _session(file, fmt, out, html, bool(events or cpu or start or end or stats or formats))
        return
    cpus = _cpu_list(cpu)
    evs = _events(events)
    s, e = _seconds(start, "--start"), _seconds(end, "--end")
    import tempfile
    with tempfile.TemporaryDirectory(prefix="vmtrace-report-") as tmp:
        trace = _open(file, formats, keep_going, tmp)
        if html:
            from vmtrace.export.timeline import write_timeline
            try:
                write_timeline(trace, html_path=html, title=f"vmtrace {file}")
            except BaseException:
                trace.close()
                raise
        _run(trace, file, fmt, out, events, evs, cpus, s, e, stats, keep_going)   # closes the trace


def _session(path: str, fmt: str, out: Optional[str], html: Optional[str], filtered: bool) -> None:
    from vmtrace import session_report
    if filtered:
        raise VmtraceError(f"{path}: a session report takes no --events/--cpu/--start/--end/--stats/--formats; "
                           "report one of its .dat files for those")
    if html:
        session_report.write_html(path, html)
    if fmt == "jsonl":
        session_report.write_jsonl(path, out)
    elif fmt == "parquet":
        from vmtrace.export.session_parquet import write_session_parquet
        from vmtrace.merge import Session
        write_session_parquet(Session(path), out)
    elif fmt in ("perfetto", "chrome"):
        write = session_report.write_perfetto if fmt == "perfetto" else session_report.write_chrome
        _summary(_writing(out, lambda: write(path, out)), out)
    else:
        session_report.write_text(path, out)


def _run(trace: Any, file: str, fmt: str, out: Optional[str], events: Optional[str],
         evs: Optional[list[str]], cpus: Optional[list[int]], s: Optional[int], e: Optional[int],
         stats: bool, keep_going: bool) -> None:
    try:
        if evs and not trace.catalog.match(evs):
            raise VmtraceError(f"{file}: no event matches --events {events!r}")
        if stats:
            if out:
                with open(out, "w", encoding="utf-8") as f:
                    _stats(trace, f)
            else:
                _stats(trace, sys.stdout)
        elif fmt == "jsonl":
            from vmtrace.export.jsonl import write_jsonl
            write_jsonl(trace, out or sys.stdout, cpus=cpus, events=evs, start=s, end=e)
        elif fmt == "parquet":
            from vmtrace.export.parquet import write_parquet
            write_parquet(trace, out, cpus=cpus, events=evs, start=s, end=e)
        elif fmt in ("perfetto", "chrome"):
            _view(trace, fmt, out, cpus=cpus, events=evs, start=s, end=e)
        else:
            _write_text(trace, out, cpus=cpus, events=evs, start=s, end=e)
        if keep_going and trace.problems:
            print(f"vmtrace: warning: {file}: skipped {len(trace.problems)} corrupt page(s) "
                  f"(first: cpu{trace.problems[0][0]} offset {trace.problems[0][1].offset}: "
                  f"{trace.problems[0][1].what})", file=sys.stderr)
    finally:
        trace.close()


class _Selected:
    """The trace as the Perfetto exporters see it: the same object (so it keeps its name
    and machine identity), but its events are the command line's selection, counted."""

    def __init__(self, trace: Any, tally: Any, **sel: Any) -> None:
        self._trace, self._tally, self._sel = trace, tally, sel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trace, name)

    def events(self, **_: Any) -> Iterator[Any]:
        return self._tally.watch(self._trace.events(**self._sel))


def _view(trace: Any, fmt: str, out: str, **sel: Any) -> None:
    """One trace as a Perfetto protobuf trace or Chrome JSON."""
    from vmtrace.session_report import Tally
    if fmt == "perfetto":
        from vmtrace.export.perfetto_proto import write_perfetto as write
    else:
        from vmtrace.export.perfetto import write_chrome_json as write
    tally = Tally()
    _writing(out, lambda: write(_Selected(trace, tally, **sel), out))
    _summary(tally, out)


def _writing(out: str, write: Any) -> Any:
    """Run an export; a file it cannot open is a one-line error, not a traceback."""
    try:
        return write()
    except OSError as exc:
        raise VmtraceError(f"{exc.filename or out}: {exc.strerror or exc}") from None


def _summary(tally: Any, out: str) -> None:
    print(f"vmtrace: {tally.summary(out)}", file=sys.stderr)
