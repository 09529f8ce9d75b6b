"""What a recording was asked to do, and what it knows of each guest as it goes.

Its own module because three others share it: the loop (:mod:`~vmtrace.host.recording`)
moves guests through their states, the conversation with each agent
(:mod:`~vmtrace.host.conversation`) fills in what the guest said, and the outputs
(:mod:`~vmtrace.host.outputs`) are written from it at the end.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, Generator, List, Optional, Sequence

from vmtrace.host.control import AgentLink
from vmtrace.host.drain import Stream
from vmtrace.host.layout import GuestLayout
from vmtrace.host.transport import Ports

HOST_NAME = "host"         # what --host-events records under
MAX_PROBLEMS = 32          # problem lines per guest; more are counted
MAX_PROBLEM_LEN = 400      # one problem line

# One guest's setup or end: a generator the loop steps once per turn.
Task = Generator[None, None, None]


@dataclass
class Options:
    """What ``vmtrace record`` was asked to do (see the command's help)."""

    outdir: Optional[str] = None
    duration: Optional[float] = None
    events: Optional[Sequence[str]] = None
    clock: Optional[str] = None
    buffer_kb: Optional[int] = None
    host_events: Optional[Sequence[str]] = None
    formats_dir: Optional[str] = None
    file_version: int = 7
    compression: Optional[str] = "zstd"
    max_size: Optional[int] = None
    max_metadata: int = 64 << 20
    keep_raw: bool = False
    base: Optional[str] = None
    hello_timeout: float = 2.0
    connect_timeout: float = 30.0
    kallsyms: bool = True


@dataclass
class Guest:
    """One guest (or the host) in a recording: its ports, what it said, where it stands."""

    name: str
    layout: GuestLayout
    raw: str
    link: Optional[AgentLink] = None
    framed: bool = False
    info: Dict[str, Any] = field(default_factory=dict)         # hello, as guest data
    agent_info: Dict[str, Any] = field(default_factory=dict)   # stats' "agent", as guest data
    cpus: List[int] = field(default_factory=list)
    streams: Dict[int, Stream] = field(default_factory=dict)
    outs: Dict[int, int] = field(default_factory=dict)
    ports: Optional[Ports] = None  # while some port may still connect
    metadata: Dict[str, bytes] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)         # meta.json, checked
    clock: Optional[str] = None
    probes: List[List[int]] = field(default_factory=list)
    orders: List[List[Any]] = field(default_factory=list)
    agent_stats: Dict[str, Any] = field(default_factory=dict)  # per CPU, checked
    state: str = "setup"  # setup, running, stopped; or gone, cut off, failed
    started: bool = False
    start_ns: int = 0     # when its start order went out
    stop_ns: int = 0      # when its stop was acknowledged (or given up on)
    task: Optional[Task] = None
    problems: List[str] = field(default_factory=list)
    more_problems: int = 0
    file: Optional[str] = None
    pending_probes: Dict[Any, Any] = field(default_factory=dict)
    pending_stats: Any = None
    next_probe: float = 0.0
    next_stats: float = 0.0
    seq: int = 0
    order_seq: int = 0
    bad_probes: int = 0
    sync: Optional[Dict[str, Any]] = None   # host-side clock sync plan (host/vcpusync.py)
    bad_stats: int = 0
    arrived_ns: int = 0   # when the last reply waited for by a task arrived
    link_noted: bool = False
    write_failed: bool = False
    process: Optional[subprocess.Popen] = None  # the host agent, for --host-events
    tmp: Optional[str] = None

    def problem(self, line: str) -> None:
        """Note a problem: one line, bounded in length and number (guest text may be in it)."""
        if len(self.problems) >= MAX_PROBLEMS:
            self.more_problems += 1
            return
        line = "".join(c if c.isprintable() else "?" for c in line)
        self.problems.append(line if len(line) <= MAX_PROBLEM_LEN else line[:MAX_PROBLEM_LEN] + "...")
