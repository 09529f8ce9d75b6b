"""``python3 -m vmtrace.agent`` / ``vmtrace agent`` / ``python3 vmtrace-agent.pyz``: argparse front end.

Standard library only. Options keep the seed's spelling (``-o``, ``-s SIZE``) so its
users feel at home; the rest is new (docs/agent.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from vmtrace.errors import VmtraceError

PIPE_MIN = 64 << 10
PIPE_MAX = 1 << 20


def parse_size(text: str) -> int:
    """``-s``: bytes, or with K/M suffix; 64 KiB .. 1 MiB like the seed, page aligned."""
    t = text.strip()
    mult = 1
    if t[-1:] in ("K", "k"):
        mult, t = 1 << 10, t[:-1]
    elif t[-1:] in ("M", "m"):
        mult, t = 1 << 20, t[:-1]
    if not t.isdigit():
        raise VmtraceError("pipe size (-s) %r is not a size like 1M, 256K or 65536" % text)
    value = int(t) * mult
    if not PIPE_MIN <= value <= PIPE_MAX:
        raise VmtraceError("pipe size (-s) must be between 64K and 1M, got %s" % text)
    page = os.sysconf("SC_PAGE_SIZE")
    return value - value % page


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmtrace agent",
        description="Guest agent: splice ftrace per-CPU ring-buffer pages to the host "
                    "(virtio-serial ports trace-path-cpuN, orders on agent-ctl-path).",
    )
    p.add_argument("-o", "--stdout", action="store_true",
                   help="write a framed stream (metadata, pages, stats) to standard output instead of the ports")
    p.add_argument("-s", "--pipe-size", default="1M", metavar="SIZE",
                   help="pipe size per CPU, 64K..1M (default 1M)")
    p.add_argument("--instance", metavar="NAME",
                   help="trace this tracefs instance (created if missing) instead of the top-level buffer")
    p.add_argument("--ports", dest="ports_dir", metavar="DIR",
                   help="directory of FIFOs or unix sockets named trace-path-cpuN and agent-ctl-path")
    p.add_argument("--output-dir", metavar="DIR",
                   help="write raw page files cpuN and metadata/ into DIR (the raw directory layout)")
    p.add_argument("--start", action="store_true", help="start at once instead of waiting for an order")
    p.add_argument("--duration", type=float, metavar="S", help="stop and exit S seconds after starting")
    p.add_argument("--flush-interval", type=float, default=1.0, metavar="S",
                   help="send a partial page when nothing moved for S seconds (default 1)")
    p.add_argument("--pump-cpus", default="auto", metavar="LIST",
                   help="where pumps run: auto (least-busy housekeeping CPUs, re-evaluated), "
                        "percpu (each on its own CPU, as the seed), or a CPU list like 1 or 2-3")
    p.add_argument("--no-kallsyms", dest="kallsyms", action="store_false",
                   help="do not collect /proc/kallsyms")
    p.add_argument("--exit-grace", type=float, default=2.0, metavar="S",
                   help="how long to wait at exit for a host that does not read (default 2)")
    p.add_argument("--nice", type=int, default=-10, metavar="N",
                   help="nice value of the pump threads (default -10: wake promptly on a shared CPU; 0 leaves it)")
    p.add_argument("--pump-priority", metavar="POLICY",
                   help="real-time priority for the pumps, as fifo:N (1-99), for guests busy on every CPU; "
                        "default: normal scheduling with --nice")
    p.add_argument("--trace-self", action="store_true",
                   help="also record the agent's own threads (by default they are kept out with "
                        "set_event_notrace_pid)")
    p.add_argument("--export", metavar="PATH",
                   help="write the agent as one self-contained zipapp to PATH and exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.export:
            from vmtrace.agent.zipapp import export

            path = export(args.export)
            print("vmtrace-agent: wrote %s (run it with: python3 %s [options])" % (path, os.path.basename(path)),
                  file=sys.stderr)
            return 0
        return run(args)
    except VmtraceError as exc:
        print("vmtrace-agent: error: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def run(args: argparse.Namespace) -> int:
    from vmtrace.agent.core import Agent, Options
    from vmtrace.agent.placement import parse_mode
    from vmtrace.tracefs import online_cpus

    if args.stdout and args.output_dir:
        raise VmtraceError("-o and --output-dir exclude each other")
    if args.flush_interval <= 0 or args.flush_interval > 3600:
        raise VmtraceError("--flush-interval must be between 0 and 3600 seconds")
    if args.duration is not None and args.duration <= 0:
        raise VmtraceError("--duration must be positive")
    if not -20 <= args.nice <= 19:
        raise VmtraceError("--nice must be between -20 and 19")
    if args.exit_grace < 0:
        raise VmtraceError("--exit-grace must not be negative")
    priority = parse_priority(args.pump_priority) if args.pump_priority else None
    if os.geteuid() != 0:
        print("vmtrace-agent: warning: not root; tracefs access will likely fail", file=sys.stderr)
    opts = Options(
        instance=args.instance,
        ports_dir=args.ports_dir,
        stdout=args.stdout,
        output_dir=args.output_dir,
        pipe_size=parse_size(args.pipe_size),
        flush_interval=args.flush_interval,
        pump_cpus=parse_mode(args.pump_cpus, online_cpus()),
        start=args.start,
        duration=args.duration,
        kallsyms=args.kallsyms,
        exit_grace=args.exit_grace,
        nice=args.nice,
        trace_self=args.trace_self,
        pump_priority=priority,
    )
    return Agent(opts).run()


def parse_priority(text: str) -> int:
    """``fifo:N`` -> N. Only SCHED_FIFO: a pump that runs until its pipe is full and then
    sleeps gains nothing from round-robin among equals."""
    policy, _, level = text.strip().lower().partition(":")
    if policy != "fifo" or not level.isdigit() or not 1 <= int(level) <= 99:
        raise VmtraceError("--pump-priority %r: use fifo:N with N from 1 to 99" % text)
    return int(level)


if __name__ == "__main__":
    sys.exit(main())
