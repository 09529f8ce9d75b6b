"""The only module that knows where tracefs keeps things.

Standard library only, Python 3.9+: the guest agent imports it. Everything else in
vmtrace asks this module for paths and settings instead of joining strings itself, so
that instances, the debugfs fallback location and the kernel's quirks (EAGAIN on
``trace_pipe_raw``, files that only exist at the top level) are handled in one place.

A :class:`Tracefs` is either the top-level buffer or an *instance*
(``instances/NAME``). Instances have their own ring buffers, event enables, clock and
buffer size, so tests, benchmarks and concurrent recordings do not disturb each other
or the user's own tracing. Metadata that is global to the kernel (``header_page``,
event formats, ``saved_cmdlines``, ``printk_formats``) is always read from the top.
"""
from __future__ import annotations

import errno
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

from vmtrace.errors import VmtraceError

CANDIDATE_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

_EVENT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def find_root() -> Optional[str]:
    """Return a mounted tracefs directory, or None."""
    for root in CANDIDATE_ROOTS:
        if os.path.exists(os.path.join(root, "trace_pipe")):
            return root
    return None


def mount(root: str = CANDIDATE_ROOTS[0]) -> str:
    """Return the tracefs root, mounting tracefs at ``root`` if nothing is mounted.

    The seed agent expected debugfs to be mounted by the user; a fresh guest or host
    often has neither, and mounting is cheap and idempotent.
    """
    found = find_root()
    if found:
        return found
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        pass
    import subprocess  # only when tracefs must be mounted: keeps the agent's start-up light

    proc = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", root],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        universal_newlines=True,
    )
    if proc.returncode != 0 or not os.path.exists(os.path.join(root, "trace_pipe")):
        msg = (proc.stderr or "").strip().splitlines()
        raise VmtraceError(
            "tracefs: not mounted and mount -t tracefs nodev %s failed%s"
            % (root, (": " + msg[-1]) if msg else "")
        )
    return root


def online_cpus(sysfs: str = "/sys/devices/system/cpu/online") -> List[int]:
    """Parse the kernel's CPU list format ("0-3,5") into a sorted list."""
    try:
        with open(sysfs) as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    return parse_cpu_list(text)


def possible_cpus() -> List[int]:
    return online_cpus("/sys/devices/system/cpu/possible")


def parse_cpu_list(text: str) -> List[int]:
    """Parse "0-3,5,7-8" (the kernel's cpulist format and our --pump-cpus syntax)."""
    cpus = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise VmtraceError("bad CPU list %r: %r is not a range" % (text, part))
            cpus.update(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            cpus.add(int(part))
        else:
            raise VmtraceError("bad CPU list %r: %r is not a number" % (text, part))
    return sorted(cpus)


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def parse_event_spec(spec: str) -> Tuple[str, Optional[str]]:
    """Turn "sched", "sched:sched_switch" or "sched/sched_switch" into (system, event).

    ``event`` is None for a whole system. Names are checked so that a spec coming from a
    remote peer can never be turned into a path outside ``events/``.
    """
    s = spec.strip().replace("/", ":")
    system, _, event = s.partition(":")
    if event in ("", "*"):
        event = None
    for part in (system, event):
        if part is not None and (not _EVENT_NAME.match(part) or part in (".", "..")):
            raise VmtraceError("bad event name %r" % spec)
    return system, event


class _Record:
    """A plain record with defaults and ==; what a dataclass gives, without importing
    dataclasses (and inspect) into the agent's start-up, which costs a guest ~8 ms."""

    _defaults: Dict[str, object] = {}

    def __init__(self, **kw: object) -> None:
        for name, default in self._defaults.items():
            value = kw.pop(name, default)
            setattr(self, name, list(value) if isinstance(value, list) else value)
        if kw:
            raise TypeError("unknown fields %s" % ", ".join(sorted(kw)))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__name__, ", ".join("%s=%r" % kv for kv in vars(self).items()))


class CpuStats(_Record):
    """One ``per_cpu/cpuN/stats`` file, parsed. Missing lines stay 0."""

    _defaults = {"entries": 0, "overrun": 0, "commit_overrun": 0, "bytes": 0, "oldest_event_ts": 0.0,
                 "now_ts": 0.0, "dropped_events": 0, "read_events": 0}
    entries: int
    overrun: int
    commit_overrun: int
    bytes: int
    oldest_event_ts: float
    now_ts: float
    dropped_events: int
    read_events: int

    @classmethod
    def parse(cls, text: str) -> "CpuStats":
        st = cls()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            name = key.strip().replace(" ", "_")
            value = value.strip()
            if not hasattr(st, name):
                continue
            try:
                setattr(st, name, float(value) if name.endswith("_ts") else int(value))
            except ValueError:
                pass
        return st

    def as_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


class Settings(_Record):
    """What :meth:`Tracefs.snapshot` saves and :meth:`Tracefs.restore` puts back.

    ``events`` are the "system:event" lines of set_event.
    """

    _defaults = {"events": [], "clock": "local", "buffer_size_kb": 0, "buffer_percent": None,
                 "tracing_on": True}
    events: List[str]
    clock: str
    buffer_size_kb: int
    buffer_percent: Optional[int]
    tracing_on: bool


# Pid filter files (Linux 5.8+): events and function hits of these pids are not recorded.
EVENT_NOTRACE_PID = "set_event_notrace_pid"
FTRACE_NOTRACE_PID = "set_ftrace_notrace_pid"


class Tracefs:
    """The top-level trace buffer, or one instance of it."""

    def __init__(self, root: Optional[str] = None, instance: Optional[str] = None):
        self.root = root or find_root() or mount()
        self.instance = instance
        if instance is not None:
            if not _EVENT_NAME.match(instance) or instance in (".", ".."):
                raise VmtraceError("bad tracefs instance name %r" % instance)
            self.path = os.path.join(self.root, "instances", instance)
        else:
            self.path = self.root

    def __repr__(self) -> str:
        return "Tracefs(%r)" % self.path

    # -- instances -------------------------------------------------------------------
    @classmethod
    def create_instance(cls, name: str, root: Optional[str] = None, exist_ok: bool = True) -> "Tracefs":
        tf = cls(root, name)
        try:
            os.mkdir(tf.path)
        except FileExistsError:
            if not exist_ok:
                raise VmtraceError("tracefs instance %s exists already" % name)
        except OSError as exc:
            raise VmtraceError("cannot create tracefs instance %s: %s" % (tf.path, exc.strerror))
        return tf

    def remove(self) -> None:
        """Remove this instance (tracing must be off; events are disabled first)."""
        if self.instance is None:
            return
        try:
            self.write("tracing_on", "0")
            self.write("events/enable", "0")
        except (OSError, VmtraceError):
            pass
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise VmtraceError("cannot remove tracefs instance %s: %s" % (self.path, exc.strerror))

    # -- plain files -----------------------------------------------------------------
    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def top_file(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def read(self, rel: str, top: bool = False) -> str:
        path = self.top_file(rel) if top else self.file(rel)
        try:
            with open(path) as f:
                return f.read()
        except OSError as exc:
            raise VmtraceError("cannot read %s: %s" % (path, exc.strerror))

    def read_bytes(self, rel: str, top: bool = False) -> bytes:
        path = self.top_file(rel) if top else self.file(rel)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise VmtraceError("cannot read %s: %s" % (path, exc.strerror))

    def write(self, rel: str, value: str, append: bool = False) -> None:
        path = self.file(rel)
        try:
            fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise VmtraceError("cannot write %r to %s: %s" % (value, path, exc.strerror))

    # -- settings --------------------------------------------------------------------
    @property
    def clocks(self) -> List[str]:
        return self.read("trace_clock").replace("[", "").replace("]", "").split()

    @property
    def clock(self) -> str:
        m = re.search(r"\[([^\]]+)\]", self.read("trace_clock"))
        return m.group(1) if m else "local"

    @clock.setter
    def clock(self, name: str) -> None:
        if name not in self.clocks:
            raise VmtraceError("trace clock %r not offered by this kernel (has: %s)" % (name, " ".join(self.clocks)))
        self.write("trace_clock", name)

    @property
    def buffer_size_kb(self) -> int:
        text = self.read("buffer_size_kb").strip()
        m = re.match(r"\d+", text)
        if m:
            return int(m.group(0))
        # "X (expanded: Y)" before the buffer is first used, or per-CPU sizes differ
        m = re.search(r"\d+", text)
        return int(m.group(0)) if m else 0

    @buffer_size_kb.setter
    def buffer_size_kb(self, kb: int) -> None:
        self.write("buffer_size_kb", str(int(kb)))

    @property
    def buffer_percent(self) -> Optional[int]:
        if not os.path.exists(self.file("buffer_percent")):
            return None
        return int(self.read("buffer_percent").strip() or 0)

    @buffer_percent.setter
    def buffer_percent(self, pct: int) -> None:
        if os.path.exists(self.file("buffer_percent")):
            self.write("buffer_percent", str(int(pct)))

    @property
    def tracing_on(self) -> bool:
        return self.read("tracing_on").strip() == "1"

    @tracing_on.setter
    def tracing_on(self, on: bool) -> None:
        self.write("tracing_on", "1" if on else "0")

    def clear(self) -> None:
        """Empty the ring buffers (writing to ``trace`` resets every CPU)."""
        self.write("trace", "")

    # -- pid filters -----------------------------------------------------------------
    def pid_list(self, name: str) -> Optional[List[int]]:
        """The pids in ``set_event_notrace_pid`` and its kin; None if the kernel has no
        such file or refuses to read it (the function-tracer files on some kernels)."""
        try:
            text = self.read(name)
        except VmtraceError:
            return None
        return sorted(int(w) for w in text.split() if w.isdigit())

    def set_pid_list(self, name: str, pids: Iterable[int]) -> None:
        """Replace a pid filter file's contents (an empty list clears it)."""
        text = " ".join(str(int(p)) for p in pids)
        # An empty write with O_TRUNC is how the kernel is told to clear the list.
        self.write(name, text + "\n" if text else "")

    # -- events ----------------------------------------------------------------------
    def event_dir(self, system: str, event: Optional[str] = None, top: bool = False) -> str:
        base = self.root if top else self.path
        return os.path.join(base, "events", system, *( [event] if event else []))

    def enable_events(self, specs: Iterable[str], enable: bool = True) -> List[str]:
        """Enable (or disable) events given as "sys", "sys:event" or "all"; return them."""
        done = []
        for spec in specs:
            if spec.strip() in ("all", "*"):
                self.write("events/enable", "1" if enable else "0")
                done.append("all")
                continue
            system, event = parse_event_spec(spec)
            d = self.event_dir(system, event)
            if not os.path.isdir(d):
                raise VmtraceError("no such trace event %s (looked for %s)" % (spec, d))
            rel = os.path.relpath(os.path.join(d, "enable"), self.path)
            self.write(rel, "1" if enable else "0")
            done.append(spec)
        return done

    def disable_all_events(self) -> None:
        self.write("events/enable", "0")

    def enabled_events(self) -> List[str]:
        """The enabled events as "system:event", from ``set_event``."""
        return [line.strip() for line in self.read("set_event").splitlines() if line.strip()]

    def event_ids(self, events: Iterable[str]) -> List[Tuple[str, str]]:
        """Expand specs into concrete (system, event) pairs that exist on this kernel."""
        out = []
        for spec in events:
            if spec.strip() in ("all", "*"):
                for system in self.systems():
                    out.extend((system, e) for e in self.system_events(system))
                continue
            system, event = parse_event_spec(spec)
            if event is None:
                out.extend((system, e) for e in self.system_events(system))
            else:
                out.append((system, event))
        return out

    def systems(self) -> List[str]:
        base = os.path.join(self.root, "events")
        return sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))

    def system_events(self, system: str) -> List[str]:
        base = os.path.join(self.root, "events", system)
        try:
            names = os.listdir(base)
        except OSError:
            raise VmtraceError("no such trace event system %s" % system)
        return sorted(n for n in names if os.path.exists(os.path.join(base, n, "format")))

    def event_format(self, system: str, event: str) -> bytes:
        return self.read_bytes(os.path.join("events", system, event, "format"), top=True)

    # -- per CPU ---------------------------------------------------------------------
    def trace_pipe_raw(self, cpu: int) -> str:
        return self.file("per_cpu", "cpu%d" % cpu, "trace_pipe_raw")

    def cpu_stats(self, cpu: int) -> CpuStats:
        return CpuStats.parse(self.read(os.path.join("per_cpu", "cpu%d" % cpu, "stats")))

    def cpus(self) -> List[int]:
        """CPUs that have a per_cpu directory *and* are online."""
        have = set()
        try:
            for name in os.listdir(self.file("per_cpu")):
                if name.startswith("cpu") and name[3:].isdigit():
                    have.add(int(name[3:]))
        except OSError:
            pass
        return [c for c in online_cpus() if c in have]

    # -- kernel-global metadata --------------------------------------------------------
    def header_page(self) -> bytes:
        return self.read_bytes("events/header_page", top=True)

    def header_event(self) -> bytes:
        return self.read_bytes("events/header_event", top=True)

    def saved_cmdlines(self) -> bytes:
        return self.read_bytes("saved_cmdlines", top=True)

    def printk_formats(self) -> bytes:
        return self.read_bytes("printk_formats", top=True)

    def subbuf_size(self) -> int:
        """The ring-buffer page size (``buffer_subbuf_size_kb``, else the system page)."""
        p = self.file("buffer_subbuf_size_kb")
        if os.path.exists(p):
            try:
                return int(self.read("buffer_subbuf_size_kb").strip()) * 1024
            except ValueError:
                pass
        return page_size()

    # -- save and restore --------------------------------------------------------------
    def snapshot(self) -> Settings:
        return Settings(
            events=self.enabled_events(),
            clock=self.clock,
            buffer_size_kb=self.buffer_size_kb,
            buffer_percent=self.buffer_percent,
            tracing_on=self.tracing_on,
        )

    def restore(self, s: Settings) -> None:
        """Put back what :meth:`snapshot` saw. Best effort: every step is attempted."""
        errors = []
        steps = [
            lambda: setattr(self, "tracing_on", False),
            self.disable_all_events,
            lambda: self.write("set_event", "\n".join(s.events) + "\n", append=True) if s.events else None,
            lambda: setattr(self, "clock", s.clock),
            lambda: setattr(self, "buffer_size_kb", s.buffer_size_kb) if s.buffer_size_kb else None,
            lambda: setattr(self, "buffer_percent", s.buffer_percent) if s.buffer_percent is not None else None,
            lambda: setattr(self, "tracing_on", s.tracing_on),
        ]
        for step in steps:
            try:
                step()
            except (OSError, VmtraceError) as exc:
                errors.append(str(exc))
        if errors:
            raise VmtraceError("restoring tracefs settings: " + "; ".join(errors))


def kallsyms(path: str = "/proc/kallsyms") -> bytes:
    """The kernel's symbol table (all zeros when kptr_restrict hides addresses)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise VmtraceError("cannot read %s: %s" % (path, exc.strerror))


def kernel_release() -> str:
    return os.uname().release


def is_eagain(exc: OSError) -> bool:
    """A modern kernel says EAGAIN on trace_pipe_raw when no full page is ready."""
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
