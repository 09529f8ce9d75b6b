"""A configure's ftrace recipe (trace-cmd's -p -l -n -g -f -T -P -M -O and dynamic
probes) on this machine's real tracefs: applied, refused with the kernel's own words,
and undone exactly, leaving tracefs as it was.

This host's kernel allows events, filters, stack traces, pid and CPU limits, options and
uprobes, and refuses the function tracer and kprobes (docs of the development machine);
the function and graph tracers and kprobes are checked in the lab guest
(tests/test_e2e_tracers.py), whose kernel has them.
"""
from __future__ import annotations

import os
import struct
import subprocess

import pytest

from vmtrace.agent.core import Agent, Options
from vmtrace.agent.recipe import Recipe
from vmtrace.errors import VmtraceError

pytestmark = pytest.mark.tracefs


def _agent(inst, tmp_path):  # noqa: F811
    return Agent(Options(instance=inst.instance, output_dir=str(tmp_path / "out")))


def _state(inst):  # noqa: F811
    """Everything a recipe may touch, as text."""
    files = ["events/sched/sched_switch/filter", "events/sched/sched_wakeup/filter", "options/stacktrace",
             "set_event_pid", "tracing_cpumask", "current_tracer", "options/event-fork", "set_event"]
    out = {f: inst.read(f).strip() for f in files}
    out["dynamic_events"] = inst.read("dynamic_events", top=True)
    return out


def _shutdown(agent):
    problems = agent._undo_recipe()
    agent.tf.restore(agent.saved)
    return problems


def test_recipe_applies_and_is_undone_exactly(inst, tmp_path):  # noqa: F811
    before = _state(inst)
    agent = _agent(inst, tmp_path)
    agent.configure({"events": ["sched:sched_switch", "sched:sched_wakeup"],
                     "filters": {"sched:sched_switch": "prev_pid == 1 || next_pid == 1"},
                     "stacktrace": True, "pids": [1, os.getpid()], "follow_forks": True,
                     "cpumask": "1", "options": {"print-parent": True}})
    assert inst.read("events/sched/sched_switch/filter").strip() == "prev_pid == 1 || next_pid == 1"
    assert inst.read("options/stacktrace").strip() == "1" and inst.read("options/event-fork").strip() == "1"
    assert sorted(int(p) for p in inst.read("set_event_pid").split()) == sorted([1, os.getpid()])
    assert inst.read("tracing_cpumask").strip().lstrip("0,") == "1"
    # the same recipe again writes nothing (a host resends an unanswered configure)
    writes = []
    real = agent.tf.write
    agent.tf.write = lambda rel, value, append=False: (writes.append(rel), real(rel, value, append))[1]
    agent.configure({"events": ["sched:sched_switch", "sched:sched_wakeup"],
                     "filters": {"sched:sched_switch": "prev_pid == 1 || next_pid == 1"},
                     "stacktrace": True, "pids": [1, os.getpid()], "follow_forks": True,
                     "cpumask": "1", "options": {"print-parent": True}})
    agent.tf.write = real
    assert [w for w in writes if "filter" in w or w in ("set_event_pid", "tracing_cpumask")] == [], writes
    assert _shutdown(agent) == []
    assert _state(inst) == before


def test_a_stack_trace_comes_with_every_event(inst, tmp_path):  # noqa: F811
    agent = _agent(inst, tmp_path)
    agent.configure({"events": ["sched:sched_switch"], "stacktrace": True})
    inst.clear()
    inst.tracing_on = True
    subprocess.run(["sleep", "0.05"])
    inst.tracing_on = False
    text = inst.read("trace")
    _shutdown(agent)
    assert "sched_switch" in text and "<stack trace>" in text and "=> " in text


def test_a_bad_filter_is_the_kernels_error_and_leaves_nothing_behind(inst, tmp_path):  # noqa: F811
    before = _state(inst)
    agent = _agent(inst, tmp_path)
    with pytest.raises(VmtraceError) as err:
        agent.configure({"events": ["sched:sched_switch"], "stacktrace": True,
                         "filters": {"sched:sched_switch": "prev_pid === 3"}})
    text = str(err.value)
    assert "-f 'prev_pid === 3' for sched:sched_switch refused by the kernel" in text
    assert "error" in text.split("refused by the kernel:")[1].lower()      # the kernel's own words
    assert "\n" not in text
    assert _state(inst) == before


@pytest.mark.parametrize("fields,message", [
    ({"tracer": "no_such_tracer"}, "-p no_such_tracer: no such tracer in instance"),
    ({"probes": ["p:vmt_nosym vmtrace_no_such_symbol_x"]}, "probe 'p:vmt_nosym vmtrace_no_such_symbol_x' refused by the kernel"),
    ({"probes": ["p:vmt_nofile /no/such/file:0x10"]}, "probe 'p:vmt_nofile /no/such/file:0x10' refused by the kernel"),
    ({"filters": {"sched:no_such_event": "pid == 1"}}, "-f for sched:no_such_event: no such event"),
    ({"options": {"no-such-option": True}}, "-O no-such-option: no such trace option"),
    ({"probes": ["rm -rf /"]}, "is not 'p:NAME SYMBOL[+off] [args]'"),
    ({"func_filter": ["a;b"]}, "is not a function name or glob"),
    ({"pids": [0]}, "pid 0 out of range"),
    ({"cpumask": "zz"}, "not a hex CPU mask"),
    ({"stacktrace": "yes"}, "stacktrace has the wrong type"),
])
def test_bad_options_are_one_line_and_change_nothing(inst, tmp_path, fields, message):  # noqa: F811
    before = _state(inst)
    agent = _agent(inst, tmp_path)
    with pytest.raises(VmtraceError) as err:
        agent.configure({"events": ["sched:sched_switch"], "stacktrace": True, **fields})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert _state(inst) == before


def _entry_file_offset(path: str) -> int:
    """The file offset of an ELF64 executable's entry point (for a uprobe there)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_vaddr <= entry < p_vaddr + p_filesz:
            return entry - p_vaddr + p_offset
    raise AssertionError("no segment holds the entry point of %s" % path)


def test_a_uprobe_is_created_recorded_and_removed(inst, tmp_path):  # noqa: F811
    target = os.path.realpath("/bin/true")
    probe = "p:vmt_test_up_%d %s:0x%x" % (os.getpid(), target, _entry_file_offset(target))
    name = "uprobes:vmt_test_up_%d" % os.getpid()
    agent = _agent(inst, tmp_path)
    assert Recipe({"probes": [probe]}).probe_events() == [name]
    agent.configure({"events": [name], "probes": [probe]})
    assert ("vmt_test_up_%d" % os.getpid()) in inst.read("dynamic_events", top=True)
    assert inst.enabled_events() == [name]
    inst.clear()
    inst.tracing_on = True
    subprocess.run([target])
    inst.tracing_on = False
    text = inst.read("trace")
    assert _shutdown(agent) == []
    assert ("vmt_test_up_%d:" % os.getpid()) in text and "true-" in text, text[-500:]
    assert ("vmt_test_up_%d" % os.getpid()) not in inst.read("dynamic_events", top=True)
