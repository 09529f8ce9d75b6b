"""Every trace-cmd plugin through both renderers: same events, same text.

A plugin is declared once (vmtrace.format.plugins.PLUGINS) with a per-event form and,
optionally, a bulk form for the fast path. These tests feed constructed events of every
registered plugin event, laid out by this machine's real format files, through the
per-event TextRenderer and through fastrender, and require identical bytes; they also
check that the comm fields a plugin declares are the ones its per-event form registers,
and that a plugin declared only per event is printed by it on the fast path too.
"""
from __future__ import annotations

import random
import re
import struct
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from vmtrace import api
from vmtrace.text import trace_blocks as text_blocks
from vmtrace.format import plugins
from vmtrace.format.events import EventCatalog
from vmtrace.format.fastrender import FastReport
from vmtrace.format.metadata import TraceMetadata
from vmtrace.format.render import TextRenderer
from vmtrace.format.ringbuffer import EventBatch
from faketrace import FakeTrace

pytestmark = pytest.mark.tracefs

EVENTS = Path("/sys/kernel/tracing/events")
KALLSYMS = (b"ffffffff81000000 T _stext\nffffffff81000100 T do_thing\n"
            b"ffffffff81000180 t helper\t[mod]\nffffffff81000200 T end_marker\n")
SYMBOLS = [0xFFFFFFFF81000105, 0xFFFFFFFF81000180, 0xFFFFFFFF81000100, 0xFFFFFFFF810001FF]
NAMES = ["sh", "kworker/0:1", "céline", "x" * 15, "", "a b"]
FIRST_ID = 2000


def _format_texts(keys) -> dict:
    """(system, event) -> its format text from tracefs, with IDs from FIRST_ID on.

    An event this kernel lacks (older kernels' kmalloc_node, kmem_cache_alloc_node)
    takes the fields of an event the same Plugin serves, under its own name: the plugin
    reads fields by name, so that is the layout it meets on such a kernel.
    """
    found = {}
    for system, name in keys:
        path = EVENTS / system / name / "format"
        if path.exists():
            found[(system, name)] = path.read_bytes()
    texts = {}
    for k, (system, name) in enumerate(keys):
        text = found.get((system, name))
        if text is None:
            plugin = plugins.PLUGINS[(system, name)]
            sibling = next((found[s] for s, p in plugins.PLUGINS.items()
                            if p is plugin and s in found), None)
            if sibling is None:
                pytest.fail(f"no format text for plugin event {system}:{name} on this machine")
            text = re.sub(rb"(?m)^name: .*$", b"name: " + name.encode(), sibling)
        texts[(system, name)] = re.sub(rb"(?m)^ID: \d+", b"ID: %d" % (FIRST_ID + k), text)
    return texts


def _value(f, rnd: random.Random) -> int:
    """Field values that reach every branch of the plugins: symbols that resolve and ones
    that do not, futex commands past the table, state and reason codes, -1."""
    name = f.name
    if name in ("call_site", "function"):
        return rnd.choice(SYMBOLS + [0, rnd.getrandbits(64)])
    if name == "prev_state":
        return rnd.choice([0, 1, 2, 0x40, 0x80, 0x100, 0x81, rnd.getrandbits(16)])
    if name == "op":
        return rnd.randrange(0, 400)
    if name == "reason":
        return rnd.randrange(0, 6)
    if name in ("pages", "prio", "prev_prio", "next_prio"):
        return rnd.choice([-1, 0, 1, 120, rnd.getrandbits(8 * f.size)])
    if name.endswith("pid"):
        return rnd.choice([0, 7, 100, 101, 2 ** 31 - 1])
    return rnd.getrandbits(8 * f.size) if rnd.random() < 0.5 else rnd.randrange(0, 300)


def _payload(fmt, rnd: random.Random) -> bytes:
    body = bytearray(fmt.fixed_size)
    tail = bytearray()
    for f in fmt.fields:
        if f.name == "common_type":
            body[f.offset:f.offset + f.size] = fmt.id.to_bytes(f.size, "little")
        elif f.is_dynamic:
            data = rnd.choice(NAMES).encode() + b"\0" if f.is_string else rnd.randbytes(8)
            start = len(body) + len(tail) - (f.offset + 4 if f.rel else 0)
            struct.pack_into("<I", body, f.offset, (len(data) << 16) | start)
            tail += data
        elif f.is_string:
            body[f.offset:f.offset + f.size] = rnd.choice(NAMES).encode()[:f.size].ljust(f.size, b"\0")
        elif f.kind == "scalar" and f.size in (1, 2, 4, 8):
            body[f.offset:f.offset + f.size] = (_value(f, rnd) % (1 << 8 * f.size)).to_bytes(f.size, "little")
        else:
            body[f.offset:f.offset + f.size] = rnd.randbytes(f.size)
    p = bytes(body + tail)
    return p + b"\0" * (-len(p) % 4)


def _batches(catalog: EventCatalog, per_type: int, seed: int) -> dict:
    """``per_type`` events of each format on each of two CPUs, in a random order."""
    rnd = random.Random(seed)
    fmts = [catalog.get(i) for i in catalog.ids()]
    out = {}
    for cpu in range(2):
        payloads = [_payload(fmt, rnd) for fmt in fmts for _ in range(per_type)]
        rnd.shuffle(payloads)
        offs = np.cumsum([0] + [len(p) for p in payloads[:-1]]).astype(np.int64)
        ts = np.arange(len(payloads), dtype=np.uint64) * np.uint64(1000) + np.uint64(cpu * 7)
        tid = np.array([int.from_bytes(p[:2], "little") for p in payloads], np.uint16)
        out[cpu] = [EventBatch(cpu=cpu, ts=ts, offset=offs, type_id=tid,
                               length=np.array([len(p) for p in payloads], np.int32),
                               data=b"".join(payloads))]
    return out


class PluginTrace(FakeTrace):
    """test_report_fast's in-memory trace, over constructed events of ``texts``, with a
    symbol table so plugins that symbolise have something to find."""

    def __init__(self, texts: dict, per_type: int = 60, seed: int = 0):
        catalog = EventCatalog.from_texts([], [(s, t) for (s, _), t in texts.items()])
        super().__init__(_batches(catalog, per_type, seed), name="")
        self.catalog = catalog
        self._common = api._common_layout(catalog, "<")
        self.source.kallsyms = KALLSYMS
        self.metadata = TraceMetadata(cmdlines=b"7 known\n", kallsyms=KALLSYMS)


def _both(texts: dict, seed: int = 0) -> tuple[bytes, bytes, dict]:
    slow = b"".join(text_blocks(PluginTrace(texts, seed=seed), fast=False))
    tr = PluginTrace(texts, seed=seed)
    fr = FastReport(tr, tr.source.buffers[0])
    fast = b"".join(text_blocks(PluginTrace(texts, seed=seed)))
    for _ in fr.blocks():
        pass
    return slow, fast, fr.counts


def _first_difference(slow: bytes, fast: bytes) -> str:
    a, b = slow.decode().splitlines(), fast.decode().splitlines()
    diff = [(x, y) for x, y in zip(a, b) if x != y][:3]
    return f"{len(a)} vs {len(b)} lines; first differences: {diff}"


@pytest.mark.parametrize("seed", range(3))
def test_every_plugin_prints_the_same_on_both_paths(seed):
    texts = _format_texts(list(plugins.PLUGINS))
    tr = PluginTrace(texts, per_type=1)
    ctx = TextRenderer(tr.metadata).ctx
    for fmt in tr.catalog:     # each plugin really applies to the events it is fed
        assert plugins.applicable_plugin(fmt, ctx) is not None, fmt.full_name
    slow, fast, counts = _both(texts, seed)
    assert slow.count(b"\n") > 60 * 2 * len(texts)
    assert fast == slow, _first_difference(slow, fast)
    # the bulk forms were used: only plugins without one went per event
    per_event_only = sum(1 for p in plugins.PLUGINS.values() if p.bulk is None)
    assert counts["per_event"] == per_event_only * 60 * 2, counts
    assert b"==>" in slow and b"(do_thing+0x5) " in slow and b"function=helper/" in slow


def test_declared_comm_fields_are_the_ones_the_plugin_registers():
    texts = _format_texts(list(plugins.PLUGINS))
    catalog = EventCatalog.from_texts([], [(s, t) for (s, _), t in texts.items()])
    rnd = random.Random(5)
    for fmt in catalog:
        plugin = plugins.PLUGINS[(fmt.system, fmt.name)]
        seen = []
        ctx = NS(symbol=lambda a: None, register_comm=lambda pid, comm: seen.append((pid, comm)))
        render = plugin.render(fmt, lambda p: "", ctx)
        p = _payload(fmt, rnd)
        render(p)
        values = fmt.decode(p)
        assert seen == [(values[pid], values[comm]) for pid, comm in plugin.comms], fmt.full_name


def _hrtimer_cancel_text() -> dict:
    path = EVENTS / "timer" / "hrtimer_cancel" / "format"
    if not path.exists():
        pytest.skip("this kernel has no timer:hrtimer_cancel")
    return {("timer", "hrtimer_cancel"): path.read_bytes()}


def test_a_plugin_declared_only_per_event_is_printed_by_it_on_the_fast_path(monkeypatch):
    """The bug the single declaration prevents: the fast path printing plain print fmt
    text for an event a per-event plugin owns."""
    def shout(fmt, default, ctx):
        return lambda p: "plugin says " + default(p)

    texts = _hrtimer_cancel_text()
    before, _, _ = _both(texts)
    monkeypatch.setitem(plugins.PLUGINS, ("timer", "hrtimer_cancel"), plugins.Plugin(shout))
    slow, fast, counts = _both(texts)
    assert slow != before and slow.count(b"plugin says ") == 2 * 60
    assert fast == slow, _first_difference(slow, fast)
    assert counts["bulk"] == 0, counts


def test_a_bulk_form_dropped_falls_back_to_the_per_event_form(monkeypatch):
    texts = _format_texts([("tlb", "tlb_flush"), ("sched", "sched_switch")])
    full, _, counts = _both(texts)
    assert counts["per_event"] == 0
    for key in texts:
        monkeypatch.setitem(plugins.PLUGINS, key, plugins.Plugin(plugins.PLUGINS[key].render,
                                                                 comms=plugins.PLUGINS[key].comms))
    slow, fast, counts = _both(texts)
    assert slow == full and fast == full, _first_difference(full, fast)
    assert counts["bulk"] == 0, counts
