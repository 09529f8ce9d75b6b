"""Coverage-guided fuzzing of the readers with atheris (libFuzzer for Python).

    python tests/support/fuzz_readers.py TARGET [libFuzzer flags, e.g. -max_total_time=600]

Targets: tracedat, rawdir, metadata, format, printfmt. Each feeds the fuzzer's bytes to
one reader the way a trace file would, and accepts exactly one outcome besides success:
a VmtraceError (FormatError), which `vmtrace report` prints as one line. Any other
exception is a crash that libFuzzer reports with the input that caused it. The seed
corpus is made from the real fixtures in tests/data, so the fuzzer starts from inputs
that reach deep into the decoder. docs/security.md ("Fuzzing the readers") has
the long run; tests/format/test_fuzz_readers.py runs each target for a few seconds.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).parent))

with atheris.instrument_imports(include=["vmtrace"]):
    from vmtrace.errors import VmtraceError
    from vmtrace.format.events import parse_format
    from vmtrace.format.fastrender import FastKallsyms
    from vmtrace.format.metadata import KallSyms, parse_cmdlines, parse_printk_formats
    from vmtrace.format.printfmt import compile_print_fmt
    from vmtrace.format.render import RENDER_ERRORS
    from vmtrace.format.tracedat_read import open_tracedat
    from vmtrace.format.rawdir import read_rawdir

import fmt_texts  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"
# Events decoded per input: enough to reach the renderers, few enough to stay fast.
EVENTS_PER_INPUT = 64
_TMP = tempfile.mkdtemp(prefix="vmtrace-fuzz-")
_FILE = os.path.join(_TMP, "input.dat")


def _decode(src) -> None:
    """Open ``src`` as the report does and render its first events."""
    from vmtrace import api
    from vmtrace.format.render import TextRenderer
    with api.Trace(src) as trace:
        r = TextRenderer(trace.metadata, long_size=src.long_size)
        events = trace.events()
        for _ in zip(range(EVENTS_PER_INPUT), r.lines(events, "")):
            pass


def fuzz_tracedat(data: bytes) -> None:
    with open(_FILE, "wb") as f:
        f.write(data)
    try:
        _decode(open_tracedat(_FILE))
    except VmtraceError:
        pass


def fuzz_rawdir(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    d = Path(_TMP) / "raw"
    md = d / "metadata" / "events" / "sched" / "sched_switch"
    md.mkdir(parents=True, exist_ok=True)
    for name in ("meta.json", "header_page", "header_event", "saved_cmdlines", "kallsyms"):
        (d / "metadata" / name).write_bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)))
    (md / "format").write_bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8192)))
    (d / "cpu0").write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    try:
        _decode(read_rawdir(d))
    except VmtraceError:
        pass


def fuzz_metadata(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cmd = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    printk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    ks = fdp.ConsumeBytes(fdp.remaining_bytes())
    parse_cmdlines(cmd)
    parse_printk_formats(printk)
    try:
        slow = KallSyms(ks)
        slow.lookup(0xffffffff81000010)
        slow.address("sym_1")
        fast = FastKallsyms(ks, KallSyms(ks))
        fast.lookup(0xffffffff81000010)
        fast.address("sym_1")
    except VmtraceError:
        pass


def fuzz_format(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        fmt = parse_format(text, system="fuzz", max_payload=4080)
        pf = compile_print_fmt(fmt.print_fmt, fmt.fields)
        if pf.render is not None:
            _render(pf.render, {f.name: 1 for f in fmt.fields})
    except VmtraceError:
        pass


def _render(render, values: dict) -> None:
    """One event's text; what the report turns into [FAILED TO PARSE] is not a crash."""
    try:
        render(values)
    except RENDER_ERRORS:
        pass


_SWITCH = parse_format(fmt_texts.sched_switch(), system="sched")


def fuzz_printfmt(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        pf = compile_print_fmt(text, _SWITCH.fields)
    except VmtraceError:
        return
    if pf.render is not None:
        _render(pf.render, {"prev_comm": "a", "prev_pid": -1, "prev_prio": 1 << 40, "prev_state": 7,
                            "next_comm": "\xff", "next_pid": 0, "next_prio": -(1 << 63)})


TARGETS = {"tracedat": fuzz_tracedat, "rawdir": fuzz_rawdir, "metadata": fuzz_metadata,
           "format": fuzz_format, "printfmt": fuzz_printfmt}


def seeds(target: str) -> list[bytes]:
    """Starting inputs: the real fixtures, or the parts of them the target reads."""
    v7 = (DATA / "tracedat_small_v7.dat").read_bytes()
    if target == "tracedat":
        return [v7, (DATA / "tracedat_small_v6.dat").read_bytes()]
    if target in ("format", "rawdir"):
        return [fmt_texts.sched_switch().encode()]
    if target == "printfmt":
        return [_SWITCH.print_fmt.encode(), b'"%*.*s %pS %d", REC->prev_pid, REC->next_pid, '
                b'__get_str(prev_comm), (void *)REC->prev_state, -(int)REC->next_prio']
    return [b"1 a\n2 b\n", b'0xffffffff81000000 : "x\\n"\n',
            b"ffffffff81000000 T sym_1\nffffffff81000100 t sym_2 [mod]\n"]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dir]")
    target = argv[1]
    args = [argv[0], *argv[2:]]
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = os.path.join(_TMP, "corpus")
        os.makedirs(corpus, exist_ok=True)
        for i, blob in enumerate(seeds(target)):
            Path(corpus, f"seed{i}").write_bytes(blob)
        args.append(corpus)
    if not any(a.startswith("-max_len=") for a in args):
        args.append("-max_len=200000")
    atheris.Setup(args, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
