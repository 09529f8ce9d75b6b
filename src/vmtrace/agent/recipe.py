"""What a ``configure`` asks of the guest's ftrace beyond events: a tracer and its
function filters, event filters, stack traces, dynamic probes, pid and CPU limits,
trace options; applied in the order the kernel needs, and undone exactly at exit.

The names follow trace-cmd record's options (``-p``, ``-l``, ``-n``, ``-g``,
``--max-graph-depth``, ``--func-stack``, ``-f``, ``-T``, ``-P``, ``-M``, ``-O``), so
that what a kernel engineer types for trace-cmd means the same here. Every step is
recorded with what it replaced before it is taken, so a failure half way leaves the
guest's tracefs as it was, and so does the agent's exit.

Standard library only (the agent runs in any guest).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from vmtrace.errors import VmtraceError
from vmtrace.tracefs import Tracefs, parse_event_spec

# Fields of a configure message that this module handles, with their JSON types.
FIELDS: Dict[str, Any] = {
    "tracer": str,                # -p: current_tracer
    "graph_thresh_us": int,       # --graph-thresh: tracing_thresh, in microseconds
    "func_filter": list,          # -l: set_ftrace_filter globs
    "func_notrace": list,         # -n: set_ftrace_notrace globs
    "graph_function": list,       # -g: set_graph_function globs
    "max_graph_depth": int,       # --max-graph-depth
    "func_stack": bool,           # --func-stack: options/func_stack_trace
    "filters": dict,              # -f: {"system:event" or "system": filter expression}
    "stacktrace": bool,           # -T: options/stacktrace
    "probes": list,               # --kprobe/--kretprobe/--uprobe: dynamic_events lines
    "pids": list,                 # -P: set_event_pid and set_ftrace_pid
    "follow_forks": bool,         # -c: options/event-fork and function-fork
    "cpumask": str,               # -M: tracing_cpumask, hex as the kernel writes it
    "options": dict,              # -O: {option name: true/false}
}
# Bounds on what a host may ask for: these become writes into the guest's kernel.
MAX_LIST = 256
MAX_TEXT = 1024
_PROBE = re.compile(r"^([prf]):(?:([A-Za-z_][A-Za-z0-9_]*)/)?([A-Za-z_][A-Za-z0-9_]*)\s+(\S+)(\s.*)?$")
_GLOB = re.compile(r"^[A-Za-z0-9_.*?\[\]!:-]+$")
_OPTION = re.compile(r"^[a-z0-9_-]+$")
_HEX_MASK = re.compile(r"^[0-9a-fA-F,]+$")


def _check_list(name: str, value: Any, item: type = str) -> List[Any]:
    if len(value) > MAX_LIST:
        raise VmtraceError("configure: %s has %d entries (at most %d)" % (name, len(value), MAX_LIST))
    for v in value:
        if not isinstance(v, item) or isinstance(v, bool):
            raise VmtraceError("configure: %s entry %r is not a %s" % (name, v, item.__name__))
        if isinstance(v, str) and not 0 < len(v) <= MAX_TEXT:
            raise VmtraceError("configure: %s entry of %d characters" % (name, len(v)))
    return list(value)


class Recipe:
    """The ftrace settings of one configure, validated (no kernel access yet)."""

    def __init__(self, fields: Mapping[str, Any]):
        self.fields: Dict[str, Any] = {}
        for key, kind in FIELDS.items():
            if key not in fields or fields[key] is None:
                continue
            value = fields[key]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise VmtraceError("configure: %s has the wrong type (want %s)" % (key, kind.__name__))
            self.fields[key] = value
        f = self.fields
        for key in ("func_filter", "func_notrace", "graph_function"):
            for glob in _check_list(key, f.get(key, [])):
                if not _GLOB.match(glob):
                    raise VmtraceError("configure: %s %r is not a function name or glob" % (key, glob))
        for line in _check_list("probes", f.get("probes", [])):
            if not _PROBE.match(line.strip()):
                raise VmtraceError("configure: probe %r is not 'p:NAME SYMBOL[+off] [args]', "
                                   "'r:NAME SYMBOL' or 'p:NAME PATH:OFFSET'" % line)
        for pid in _check_list("pids", f.get("pids", []), int):
            if not 0 < pid < (1 << 22):
                raise VmtraceError("configure: pid %d out of range" % pid)
        for spec, expr in f.get("filters", {}).items():
            if not isinstance(expr, str) or not 0 < len(expr) <= MAX_TEXT:
                raise VmtraceError("configure: filter for %s must be a text of 1..%d characters" % (spec, MAX_TEXT))
            parse_event_spec(spec)
        if len(f.get("filters", {})) > MAX_LIST:
            raise VmtraceError("configure: more than %d filters" % MAX_LIST)
        for name, on in f.get("options", {}).items():
            if not _OPTION.match(name) or not isinstance(on, bool):
                raise VmtraceError("configure: option %r must be a name with true or false" % (name,))
        if "cpumask" in f and not _HEX_MASK.match(f["cpumask"]):
            raise VmtraceError("configure: cpumask %r is not a hex CPU mask like 3 or ff,ffffffff" % f["cpumask"])
        if "max_graph_depth" in f and not 0 <= f["max_graph_depth"] <= 1000:
            raise VmtraceError("configure: max_graph_depth %d out of range 0..1000" % f["max_graph_depth"])
        if "graph_thresh_us" in f and not 0 <= f["graph_thresh_us"] <= 10 ** 9:
            raise VmtraceError("configure: graph_thresh_us %d out of range" % f["graph_thresh_us"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and other.fields == self.fields

    def __bool__(self) -> bool:
        return bool(self.fields)

    def probe_events(self) -> List[str]:
        """The "group:name" of every probe this recipe creates."""
        out = []
        for line in self.fields.get("probes", []):
            m = _PROBE.match(line.strip())
            kind, group, name, target = m.group(1), m.group(2), m.group(3), m.group(4)
            if group is None:
                group = "uprobes" if kind == "p" and "/" in target else ("eprobes" if kind == "e" else "kprobes")
            out.append("%s:%s" % (group, name))
        return out

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.fields)


class Applied:
    """The undo log of one applied recipe: (what, how to put it back), newest last."""

    def __init__(self, tf: Tracefs):
        self.tf = tf
        self.steps: List[Tuple[str, Callable[[], None]]] = []

    def undo(self) -> List[str]:
        """Put everything back, newest first; every step is tried; problems are returned."""
        problems = []
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except (OSError, VmtraceError) as exc:
                problems.append("undoing %s: %s" % (what, exc))
        return problems


def apply(recipe: Recipe, tf: Tracefs, log: Applied) -> None:
    """Apply ``recipe`` to ``tf``, recording every change in ``log``; a refusal raises
    the kernel's own words, naming the option, and the caller rolls ``log`` back (after
    disabling events: an enabled probe cannot be removed). Events themselves are enabled
    by the caller between :func:`create_probes` and this (filters need the events; the
    tracer wants its function filters in place before it starts)."""
    f = recipe.fields
    for spec, expr in sorted(f.get("filters", {}).items()):
        _set_filter(tf, log, spec, expr)
    if "pids" in f:
        pids = f["pids"]
        _replace(tf, log, "set_event_pid", " ".join(map(str, pids)), "-P: set_event_pid")
        if os.path.exists(tf.file("set_ftrace_pid")) and f.get("tracer", "nop") != "nop":
            _replace(tf, log, "set_ftrace_pid", " ".join(map(str, pids)), "-P: set_ftrace_pid")
    if f.get("follow_forks"):
        _option(tf, log, "event-fork", True, "-c")
        if f.get("tracer", "nop") != "nop":
            _option(tf, log, "function-fork", True, "-c")
    for key, name, flag in (("func_filter", "set_ftrace_filter", "-l"), ("func_notrace", "set_ftrace_notrace", "-n"),
                            ("graph_function", "set_graph_function", "-g")):
        if f.get(key):
            _functions(tf, log, name, f[key], flag)
    if "max_graph_depth" in f:
        _replace(tf, log, "max_graph_depth", str(f["max_graph_depth"]), "--max-graph-depth")
    if "graph_thresh_us" in f:
        _replace(tf, log, "tracing_thresh", str(f["graph_thresh_us"]), "--graph-thresh")
    if "cpumask" in f:
        _replace(tf, log, "tracing_cpumask", f["cpumask"], "-M")
    if "tracer" in f:
        _tracer(tf, log, f["tracer"])
    if f.get("func_stack"):
        _option(tf, log, "func_stack_trace", True, "--func-stack")
    if "stacktrace" in f:
        _option(tf, log, "stacktrace", f["stacktrace"], "-T")
    for name, on in sorted(f.get("options", {}).items()):
        _option(tf, log, name, on, "-O")


def create_probes(recipe: Recipe, tf: Tracefs, log: Applied) -> None:
    """Create the recipe's dynamic events (before events are enabled: they are events)."""
    lines = recipe.fields.get("probes", [])
    if not lines:
        return
    target = "dynamic_events" if os.path.exists(tf.top_file("dynamic_events")) else None
    for line, event in zip(lines, recipe.probe_events()):
        kind_file = target or ("uprobe_events" if event.startswith("uprobes:") else "kprobe_events")
        try:
            _write_top(tf, kind_file, line.strip() + "\n", append=True)
        except VmtraceError:
            raise VmtraceError("configure: probe %r refused by the kernel: %s" % (line, _kernel_error(tf))) from None
        group, name = event.split(":")
        log.steps.append(("probe %s" % event,
                          lambda kf=kind_file, g=group, n=name: _write_top(tf, kf, "-:%s/%s\n" % (g, n), append=True)))


# -- the steps ------------------------------------------------------------------------------

def _write_top(tf: Tracefs, rel: str, text: str, append: bool = False) -> None:
    """Dynamic events live at the top level whichever instance we trace."""
    path = tf.top_file(rel)
    try:
        fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise VmtraceError("cannot write %s: %s" % (path, exc.strerror)) from None


def _kernel_error(tf: Tracefs) -> str:
    """The newest line the kernel wrote into error_log (its own words), if any."""
    try:
        lines = [l.strip() for l in tf.read("error_log", top=True).splitlines() if l.strip()]
    except VmtraceError:
        return "no reason given"
    # entries look like "[ts] trace_kprobe: error: Failed to register probe event" + command + caret
    for line in reversed(lines):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return lines[-1] if lines else "no reason given"


def _read_setting(tf: Tracefs, rel: str, what: str) -> str:
    try:
        return tf.read(rel)
    except VmtraceError as exc:
        raise VmtraceError("configure: %s: this kernel has no %s (%s)" % (what, rel, exc)) from None


def _replace(tf: Tracefs, log: Applied, rel: str, value: str, what: str) -> None:
    before = _read_setting(tf, rel, what).strip()
    try:
        tf.write(rel, value + "\n" if value else "")
    except VmtraceError as exc:
        raise VmtraceError("configure: %s %r refused: %s" % (what, value, exc)) from None
    log.steps.append((rel, lambda: tf.write(rel, _restorable(rel, before))))


def _restorable(rel: str, before: str) -> str:
    """What to write back: pid lists and masks as read; an empty list clears."""
    if rel in ("set_event_pid", "set_ftrace_pid") and before.startswith("no pid"):
        return ""
    return before + "\n" if before else ""


def _functions(tf: Tracefs, log: Applied, rel: str, globs: Sequence[str], flag: str) -> None:
    """Each glob on its own, so that the one the kernel refuses (no such function) is named."""
    before = [l.strip() for l in _read_setting(tf, rel, flag).splitlines()
              if l.strip() and not l.startswith("#")]
    try:
        tf.write(rel, "")                   # O_TRUNC clears the list
    except VmtraceError as exc:
        raise VmtraceError("configure: %s: the kernel refuses function filters here (%s)" % (flag, exc)) from None
    log.steps.append((rel, lambda: _restore_functions(tf, rel, before)))
    for glob in globs:
        try:
            tf.write(rel, glob + "\n", append=True)
        except VmtraceError as exc:
            if "Invalid argument" in str(exc):
                raise VmtraceError("configure: %s %s: no function of this kernel matches it (see "
                                   "available_filter_functions)" % (flag, glob)) from None
            raise VmtraceError("configure: %s %s refused: %s" % (flag, glob, exc)) from None


def _restore_functions(tf: Tracefs, rel: str, before: List[str]) -> None:
    tf.write(rel, "")
    for fn in before:
        # an entry may carry a ':mod:...' or a count; a plain name is what we can restore
        tf.write(rel, fn.split()[0] + "\n", append=True)


def _set_filter(tf: Tracefs, log: Applied, spec: str, expr: str) -> None:
    system, event = parse_event_spec(spec)
    rel = "events/%s/%s/filter" % (system, event) if event else "events/%s/filter" % system
    if not os.path.exists(tf.file(rel)):
        raise VmtraceError("configure: -f for %s: no such event" % spec)
    if event:
        before = tf.read(rel).strip()
        undo = lambda: tf.write(rel, "0" if before == "none" else before)  # noqa: E731
    else:
        undo = lambda: tf.write(rel, "0")  # noqa: E731 - a system filter we set, cleared
    # logged before the write: a refused filter stays in the file as the kernel's error
    # text (the event is not filtered, but the file no longer reads "none")
    log.steps.append(("filter of %s" % spec, undo))
    try:
        tf.write(rel, expr)
    except VmtraceError:
        raise VmtraceError("configure: -f %r for %s refused by the kernel: %s"
                           % (expr, spec, _filter_error(tf, rel, system, event))) from None


def _filter_error(tf: Tracefs, rel: str, system: str, event: Optional[str]) -> str:
    """The kernel explains a bad filter in the filter file itself (or error_log)."""
    path = rel if event else None
    if path is None:
        try:
            names = tf.system_events(system)
        except VmtraceError:
            names = []
        path = "events/%s/%s/filter" % (system, names[0]) if names else rel
    try:
        text = tf.read(path)
    except VmtraceError:
        return _kernel_error(tf)
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")]
    errs = [l for l in lines if "error" in l.lower()]
    return errs[-1] if errs else _kernel_error(tf)


def _tracer(tf: Tracefs, log: Applied, name: str) -> None:
    try:
        have = tf.read("available_tracers").split()
    except VmtraceError:
        have = []
    if name not in have:
        where = "instance %s" % tf.instance if tf.instance else "this guest"
        raise VmtraceError("configure: -p %s: no such tracer in %s (it has: %s)" % (name, where, " ".join(have) or "none"))
    before = tf.read("current_tracer").strip() or "nop"
    if before == name:
        return
    try:
        tf.write("current_tracer", name)
    except VmtraceError as exc:
        raise VmtraceError("configure: -p %s refused: %s" % (name, exc)) from None
    log.steps.append(("current_tracer", lambda: tf.write("current_tracer", before)))


def _option(tf: Tracefs, log: Applied, name: str, on: bool, flag: str) -> None:
    rel = "options/%s" % name
    if not os.path.exists(tf.file(rel)):
        raise VmtraceError("configure: %s %s: no such trace option here (with this tracer)" % (flag, name))
    before = tf.read(rel).strip()
    want = "1" if on else "0"
    if before == want:
        return
    try:
        tf.write(rel, want)
    except VmtraceError as exc:
        raise VmtraceError("configure: %s %s refused: %s" % (flag, name, exc)) from None
    log.steps.append((rel, lambda: tf.write(rel, before)))
