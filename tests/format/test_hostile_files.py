"""Crafted trace files, raw directories, ``-o`` streams and metadata against `vmtrace report`.

One case per class of problem a security review reproduced (issue 12), and the
neighbours of each: every case is a real fixture with one part changed the way an
attacker would (tests/support/hostile.py), run as a child process under an address-space limit
and a timeout (tests/support/bounded.py). Whatever the input, `vmtrace report` must end within
its time and memory, with exit 0 or exactly one ``vmtrace: error:`` line and exit 2, and
never a traceback. Where the right outcome is known the case says it: the refusal names
the file and the field, or the report goes on and prints ``[FAILED TO PARSE]`` for the
one event type whose print fmt cannot be compiled, as trace-cmd does.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest

import hostile
from bounded import assert_clean_exit, run_bounded

# Every run here must stay under these, whatever the input (docs/security.md):
MAX_RSS_MB = 1024
MAX_WALL_S = 30.0       # the fixture reports in 0.3 s; a shared 2-core CI is slow, not 100x

GZIP_MEMBER = gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0)   # 64 MiB of zeros


@dataclass
class Case:
    build: Callable[[Path], Path]
    args: Sequence[str] = ()
    exit: Optional[int] = None           # None: 0 or 2 both fine
    error: Sequence[str] = ()            # words the one error line must hold
    stdout: Sequence[str] = ()           # words the report must hold (exit 0)
    not_stdout: Sequence[str] = ()       # words that must never be printed
    formats: Sequence[str] = ("text",)
    as_limit: int = 4 << 30
    wall: float = 30.0                   # time allowed (CPU cases: well under the old cost)
    extra: dict = field(default_factory=dict)


def _raw(md_change=None, cpus_change=None):
    def build(tmp: Path) -> Path:
        md, cpus, _ = hostile.base_parts()
        if md_change:
            md = md_change(md, tmp)
        if cpus_change:
            cpus = cpus_change(cpus)
        return hostile.write_raw(tmp / "raw", md, cpus)
    return build


def _dat(md_change=None, version=7, compression="zstd"):
    def build(tmp: Path) -> Path:
        md, cpus, _ = hostile.base_parts()
        if md_change:
            md = md_change(md, tmp)
        return hostile.write_dat(tmp / "trace.dat", md, cpus, version=version,
                                 compression=compression)
    return build


def _set(name: str, data: bytes):
    def change(md, tmp):
        md = dict(md)
        md[name] = data
        return md
    return change


def _fmt(event: str, print_fmt: str):
    return lambda md, tmp: hostile.with_print_fmt(md, event, print_fmt)


def _field(event: str, line: str):
    return lambda md, tmp: hostile.with_extra_field(md, event, line)


# -------------------------------------------------------------- decompression bombs

KALLSYMS_GZIP_BOMB = GZIP_MEMBER * 32     # 2 GiB of zeros, 2 MB of gzip members


def _options_chain(tmp: Path, n: int = 64, each: int = 256 << 20) -> Path:
    """The fixture (zstd v7) with ``n`` compressed options sections chained in front of
    its own, each inflating to ``each`` bytes of one unknown option that a reader keeps."""
    import zstandard
    blob = bytearray(hostile.FIXTURE_V7.read_bytes())
    first_at = hostile.section_headers(bytes(blob))["options_end"]
    first = struct.unpack_from("<Q", blob, first_at)[0]
    z = zstandard.ZstdCompressor(level=19, write_content_size=False)
    big = z.compress(struct.pack("<HI", 100, each - 6 - 14) + bytes(each - 6 - 14))
    nxt = first
    for _ in range(n):
        at = len(blob)
        done = z.compress(struct.pack("<HIQ", 0, 8, nxt))
        data = big + done
        body = struct.pack("<II", len(data), each) + data
        blob += struct.pack("<HHIQ", 0, 1, 0, len(body)) + body
        nxt = at
    struct.pack_into("<Q", blob, first_at, nxt)
    out = tmp / "chain.dat"
    out.write_bytes(bytes(blob))
    return out


# -------------------------------------------------------------- slow text

def _kallsyms_text(n: int) -> bytes:
    return b"".join(b"%016x t sym_%d\n" % (0xffffffff81000000 + 16 * i, i) for i in range(n))


def _many_atoms(md, tmp):
    md = hostile.with_print_fmt(
        md, "sched_stat_runtime",
        '"' + "%lx " * 60 + '", ' + ", ".join(f"unknown_symbol_{i}" for i in range(60)))
    md["kallsyms"] = _kallsyms_text(600_000)
    return md


# -------------------------------------------------------------- raw directory files

def _symlinked(name: str):
    def change(md, tmp):
        secret = tmp / "root-only"
        secret.write_text("4242 TOPSECRET\n")
        os.chmod(secret, 0o600)
        md = dict(md)
        md.pop(name, None)
        return md
    return change


def _link_after(name: str):
    def build(tmp: Path) -> Path:
        d = _raw(_symlinked(name))(tmp)
        target = d / "metadata" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(tmp / "root-only", target)
        return d
    return build


def _fifo_after(name: str):
    def build(tmp: Path) -> Path:
        d = _raw()(tmp)
        target = d / name
        target.unlink()
        os.mkfifo(target)
        return d
    return build


def _stream(ncpus: int) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        from vmtrace import protocol
        from vmtrace.protocol import STREAM_MAGIC
        md, cpus, ps = hostile.base_parts()
        out = bytearray(STREAM_MAGIC)
        out += protocol.encode(protocol.pack_files(md))
        page = cpus[0][:ps]
        for cpu in range(ncpus):
            out += hostile.stream_frame(protocol.PAGES, {"cpu": cpu}, page)
        p = tmp / "stream.out"
        p.write_bytes(bytes(out))
        return p
    return build


CASES: dict[str, Case] = {
    # Decompression: every output is limited, and the limits add up per file.
    "kallsyms-gzip-bomb-v7": Case(_dat(_set("kallsyms", KALLSYMS_GZIP_BOMB)), exit=2,
                                  error=["trace.dat", "kallsyms", "gzip"]),
    "kallsyms-gzip-bomb-rawdir": Case(_raw(_set("kallsyms", KALLSYMS_GZIP_BOMB)), exit=2,
                                      error=["raw", "kallsyms", "gzip"]),
    "kallsyms.gz-bomb-rawdir": Case(_raw(_set("kallsyms.gz", KALLSYMS_GZIP_BOMB)), exit=2,
                                    error=["kallsyms.gz"]),
    "options-chain-bomb": Case(_options_chain, exit=2, error=["chain.dat", "offset"]),
    # Sizes and widths from the file are bounded before anything is allocated.
    "field-offset-16M": Case(_dat(lambda md, tmp: _fmt("sched_stat_runtime", '"%d", REC->evil')(
        _field("sched_stat_runtime", "\tfield:int evil;\toffset:16777212;\tsize:4;\tsigned:1;")(
            md, tmp), tmp)), args=("--keep-going",),
        formats=("text", "jsonl", "parquet"), exit=2, error=["sched_stat_runtime", "evil", "16777212"]),
    "print-width-100M": Case(_dat(_fmt("sched_stat_runtime", '"%100000000u", REC->pid')),
                             exit=0, stdout=["[FAILED TO PARSE]"]),
    "print-star-width": Case(_dat(_fmt("sched_stat_runtime", '"%*u%*u%*u", REC->runtime, REC->pid,'
                                       ' REC->runtime, REC->pid, REC->runtime, REC->pid')),
                             exit=0, stdout=["sched_stat_runtime:"],
                             formats=("text", "jsonl")),
    "print-precision-100M": Case(_dat(_fmt("sched_stat_runtime", '"%.100000000s", __get_str(comm)')),
                                 exit=0, stdout=["[FAILED TO PARSE]"]),
    "print-conversions-10k": Case(_dat(_fmt("sched_stat_runtime", '"' + "%d" * 10000 + '", '
                                            + ", ".join(["REC->pid"] * 10000))),
                                  exit=0, stdout=["[FAILED TO PARSE]"]),
    # Linear time on text from the file.
    "header-page-padding": Case(_dat(_set("header_page", b"\tfield: u64 timestamp;\toffset:0;"
                                          b"\tsize:8;\tsigned:0;\n\tfield:" + b" " * 5000 + b"x"
                                          + b" " * 5000 + b"\n")),
                                exit=2, error=["header_page"], wall=10),
    "field-decl-10k": Case(_dat(_field("sched_switch", "\tfield:int " + "a" * 40000 + "!;"
                                       "\toffset:8;\tsize:4;\tsigned:1;")),
                           exit=2, error=["cannot parse field declaration"], wall=10),
    "unknown-atoms-kallsyms": Case(_dat(_many_atoms), exit=0, stdout=["sched_stat_runtime:"],
                                   wall=10),
    "cmdlines-padding": Case(_dat(_set("saved_cmdlines", b"1 a" + b" " * 100000 + b"b\n" * 3)),
                             exit=0, wall=10),
    "printk-padding": Case(_dat(_set("printk_formats", b"0x1 : x" + b" " * 100000 + b"y\n")),
                           exit=0, wall=10),
    # Symbolic links and special files in a raw directory are never followed or opened.
    "symlink-saved_cmdlines": Case(_link_after("saved_cmdlines"), exit=2,
                                   error=["saved_cmdlines", "symbolic link"],
                                   not_stdout=["TOPSECRET"]),
    "symlink-event-format": Case(_link_after("events/sched/sched_switch/format"), exit=2,
                                 error=["sched_switch", "symbolic link"]),
    "fifo-cpu-file": Case(_fifo_after("cpu0"), exit=2, error=["cpu0", "regular"]),
    "fifo-header_page": Case(_fifo_after("metadata/header_page"), exit=2,
                             error=["header_page", "regular"]),
    # One line, never a traceback.
    "octal-09": Case(_dat(_fmt("sched_stat_runtime", '"%d", 09')), exit=0,
                     stdout=["[FAILED TO PARSE]"]),
    "literal-5000-digits": Case(_dat(_fmt("sched_stat_runtime", '"%d", ' + "9" * 5000)), exit=0,
                                stdout=["[FAILED TO PARSE]"]),
    "unary-minus-150": Case(_dat(_fmt("sched_stat_runtime", '"%d", ' + "-" * 150 + "REC->pid")),
                            exit=0, stdout=["sched_stat_runtime:"]),
    "parens-150": Case(_dat(_fmt("sched_stat_runtime", '"%d", ' + "(" * 150 + "REC->pid"
                                 + ")" * 150)), exit=0, stdout=["sched_stat_runtime:"]),
    "get_str-no-arg": Case(_dat(_fmt("sched_stat_runtime", '"%s", __get_str()')), exit=0,
                           stdout=["[FAILED TO PARSE]"]),
    "meta-json-deep": Case(_raw(_set("meta.json", b"[" * 100_000)), exit=2,
                           error=["meta.json"]),
    "event-id-5000-digits": Case(_dat(lambda md, tmp: {
        **md, hostile.event_format_key(md, "sched_switch"):
        md[hostile.event_format_key(md, "sched_switch")].replace(b"ID: ", b"ID: " + b"1" * 5000, 1)}),
        exit=None),
    "cmdline-pid-5000-digits": Case(_dat(_set("saved_cmdlines", b"1" * 5000 + b" x\n")), exit=0),
    "stream-2000-cpus": Case(_stream(2000), exit=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name, tmp_path):
    case = CASES[name]
    target = case.build(tmp_path)
    for fmt in case.formats:
        args = ["report", *case.args]
        if fmt != "text":
            args += ["--format", fmt, "-o", str(tmp_path / f"out.{fmt}")]
        res = run_bounded([*args, str(target)], timeout=MAX_WALL_S + 30, as_limit=case.as_limit)
        assert_clean_exit(res, max_wall_s=min(case.wall, MAX_WALL_S), max_rss_mb=MAX_RSS_MB)
        if case.exit is not None:
            assert res.returncode == case.exit, res.describe()
        if res.returncode == 2:
            line = res.stderr.strip()
            for word in case.error:
                assert word in line, (word, res.describe())
        for word in case.stdout if fmt == "text" else ():
            assert word in res.stdout, (word, res.describe())
        for word in case.not_stdout:
            assert word not in res.stdout and word not in res.stderr, res.describe()
