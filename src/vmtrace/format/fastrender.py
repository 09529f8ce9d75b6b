"""``trace-cmd report`` text, many events at a time: same bytes, a few times faster.

:mod:`vmtrace.format.render` formats one event per call; this module formats a whole
chunk of merged events with a handful of numpy steps and one ``%`` operation per line,
and falls back to the per-event renderer wherever bulk rendering could differ:

1. **Merge** (:mod:`.fastmerge`). Each CPU's items are merged in trace-cmd's order and
   released in windows, so memory stays about one decoded chunk per CPU.
2. **Comm column.** trace-cmd learns task names from sched_switch/sched_wakeup as it
   prints them (a pid gets the first name seen, the event that teaches it still shows
   the old one). A pass over just those events, in merged order, gives for each pid the
   position from which its new name applies.
3. **Lines per event type.** For each (batch, event type) in a window the fields used by
   the print fmt (or plugin) are gathered into numpy columns (:mod:`.fastcolumns`);
   each conversion's argument becomes a column (:mod:`.fastargs`): simple casts in
   numpy, helper calls (flags, symbols, printk strings) evaluated once per distinct
   value, anything else per event with the same generated expression the per-event
   renderer uses. Then
   ``list(map(FMT.__mod__, zip(head, sec, usec, *args)))`` makes the lines, where FMT is
   the buffer prefix, the header layout with the CPU filled in, the padded name and the
   print fmt's own format.
4. Lines are scattered back into merged order and written in large blocks (here).

Payloads too short for the fields used, ``__data_loc`` strings pointing past the
payload, event types with fields or helpers not handled here, and any group whose bulk
evaluation raises go through :class:`~vmtrace.format.render.TextRenderer` unchanged.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from vmtrace.format.fastargs import _b, _NotAscii, _Type
from vmtrace.format.fastcolumns import _concat_groups, _Group, _materialize
from vmtrace.format.fastkallsyms import FastKallsyms
from vmtrace.format.fastmerge import Merge, _Seg
from vmtrace.format.printfmt import M64
from vmtrace.format.render import TextRenderer, event_name_column, lost_text

__all__ = ["FastReport", "FastKallsyms", "supported", "report_blocks", "SUB_CHUNK"]

# Lines rendered per step: bounds the Python objects alive at once (~64k lines of text).
SUB_CHUNK = 1 << 16

_U64 = np.uint64


class FastReport:
    """All lines of one buffer's report, as text blocks (see the module text)."""

    def __init__(self, trace: Any, buffer: Any, cpus: Optional[List[int]] = None,
                 renderer: Optional[TextRenderer] = None):
        self.trace = trace
        self.buffer = buffer
        self.prefix = f"{buffer.name}: " if buffer.name else ""
        ks = FastKallsyms(getattr(trace.source, "kallsyms", None),
                          getattr(trace.metadata, "kallsyms", None))
        self.r = renderer or TextRenderer(trace.metadata, long_size=trace.source.long_size,
                                          kallsyms=ks)
        self.comms = self.r.comms
        self.types: Dict[int, _Type] = {}
        self.heads: Dict[Tuple[int, str], str] = {}
        self.merge = Merge(trace, buffer, cpus)
        self.after_drop: set = set()
        self.counts = {"bulk": 0, "per_event": 0}   # lines each way (tests, tuning)

    # -- rendering ------------------------------------------------------------------
    def blocks(self) -> Iterator[bytes]:
        for segs, seg_ix, codes in self.merge.windows():
            for a in range(0, seg_ix.shape[0], SUB_CHUNK):
                yield self._render(segs, seg_ix[a:a + SUB_CHUNK], codes[a:a + SUB_CHUNK])

    def _type(self, tid: int) -> _Type:
        t = self.types.get(tid)
        if t is None:
            t = self.types[tid] = _Type(self.trace.catalog.get(tid), self.r, self.prefix)
        return t

    def _render(self, segs: List[_Seg], seg_ix: np.ndarray, codes: np.ndarray) -> bytes:
        n = seg_ix.shape[0]
        is_ev = codes >= 0
        pid = np.zeros(n, np.int64)
        tid = np.zeros(n, np.int64)
        ts = np.zeros(n, np.uint64)
        cpu = np.zeros(n, np.int64)
        present = np.flatnonzero(np.bincount(seg_ix, minlength=len(segs))).tolist()
        for k in present:
            seg = segs[k]
            m = seg_ix == k
            cpu[m] = seg.cpu
            me = m & is_ev
            e = codes[me]
            pid[me] = seg.pids[e]
            tid[me] = seg.batch.type_id[e]
            ts[me] = seg.batch.ts[e]
        out = np.empty(n, dtype=object)
        # groups of (segment, type), each in merged order: a counting sort
        ev_pos = np.flatnonzero(is_ev)
        gkey = seg_ix[ev_pos].astype(np.int64) * 65536 + tid[ev_pos]
        # Dense group numbers from the keys present: a table indexed by the key itself
        # had 65536 entries per segment, 1 GB for a window of 2000 CPUs' chunks.
        ukeys, ginv = np.unique(gkey, return_inverse=True)
        counts = np.bincount(ginv.reshape(-1), minlength=ukeys.shape[0])
        gorder = np.argsort(ginv.reshape(-1), kind="stable")
        bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
        groups = []
        for g, key in enumerate(ukeys.tolist()):
            P = ev_pos[gorder[bounds[g]:bounds[g + 1]]]
            groups.append((segs[key >> 16], key & 0xFFFF, P))
        # 1. what each group's fields are (also feeds the comm pass)
        gathered = []
        regs = []
        for seg, t, P in groups:
            ty = self._type(t)
            gr = None
            bulk = ty.bulk
            if bulk and ty.fmt is not None:
                b = seg.batch
                E = codes[P]
                try:
                    gr = _Group(seg, b.offset[E], b.length[E].astype(np.int64), ty)
                except (ValueError, TypeError, IndexError):
                    bulk = False
            gathered.append((seg, ty, P, gr, bulk))
            if ty.reg is not None:
                regs.append(self._registrations(seg, ty, P, codes, gr))
        newly = self._learn(regs) if regs else {}
        # 2. the comm-pid column
        heads = self._heads(pid, is_ev, newly)
        # 3. time columns
        times = _Times(ts, cpu)
        # 4. lines; with the CPU in the time text, one event type's groups of all CPUs
        # are formatted together
        if times.text is not None:
            gathered = self._merged(gathered, out, heads, times)
        for seg, ty, P, gr, bulk in gathered:
            lines = None
            if bulk:
                try:
                    lines = self._bulk_lines(seg, ty, P, gr, heads, times, codes)
                except (ValueError, TypeError, OverflowError, KeyError, IndexError, ZeroDivisionError):
                    lines = None
            if lines is None:
                lines = self._slow_lines(seg, ty, P, codes, heads, times)
            else:
                self.counts["bulk"] += len(lines)
                lines = _strip_trailing_newline(lines)
            out[P] = lines
        # 5. lost-event markers; the next event of that CPU carries no buffer prefix
        mk = np.flatnonzero(~is_ev)
        for p in mk.tolist():
            seg = segs[int(seg_ix[p])]
            out[p] = (self.prefix + lost_text(seg.cpu, seg.markers[~int(codes[p])][0])).encode(
                "utf-8", "surrogateescape")
        if self.prefix and (mk.shape[0] or self.after_drop):
            self._strip_after_drop(out, cpu, is_ev, mk)
        lines = out.tolist()
        lines.append(b"")
        return b"\n".join(lines)

    def _merged(self, gathered: list, out: np.ndarray, heads: np.ndarray, times: "_Times") -> list:
        """Format same-type groups of different chunks at once; return the others."""
        by_type: Dict[int, list] = {}
        rest = []
        for e in gathered:
            seg, ty, P, gr, bulk = e
            if bulk and gr is not None and ty.fmt is not None and not gr.bad.any():
                by_type.setdefault(id(ty), []).append(e)
            else:
                rest.append(e)
        for entries in by_type.values():
            if len(entries) == 1:
                rest.append(entries[0])
                continue
            P = np.concatenate([e[2] for e in entries])
            try:
                gr = _concat_groups([e[3] for e in entries])
                lines = self._format(entries[0][0], entries[0][1], P, gr, heads, times,
                                     allow_str=False)
            except (ValueError, TypeError, OverflowError, KeyError, IndexError,
                    ZeroDivisionError, _NotAscii):
                rest.extend(entries)
                continue
            self.counts["bulk"] += len(lines)
            out[P] = lines
        return rest

    def _bulk_lines(self, seg: _Seg, ty: _Type, P: np.ndarray, gr: Optional[_Group],
                    heads: np.ndarray, times: "_Times", codes: np.ndarray) -> Optional[list]:
        if gr is None:     # unknown event: header only
            F = ty.line_fmt(seg.cpu, times.text is not None)
            return list(map(F.__mod__, zip(heads[P].tolist(), *times.cols(P))))
        if gr.bad.any():
            return None if gr.bad.all() else self._mixed(seg, ty, P, gr, heads, times, codes)
        return self._format(seg, ty, P, gr, heads, times)

    def _format(self, seg: _Seg, ty: _Type, P: np.ndarray, gr: _Group, heads: np.ndarray,
                times: "_Times", allow_str: bool = True) -> list:
        hl = heads[P].tolist()
        try:
            cols = [a.column(gr, c) for a, c in zip(ty.args, ty.convs)]
            F = ty.line_fmt(seg.cpu, times.text is not None)
            return list(map(F.__mod__, zip(hl, *times.cols(P), *cols)))
        except _NotAscii:
            if not allow_str:
                raise
        # padded non-ASCII text: pad characters, as the per-event renderer does
        sl, ul = times.ints(P)
        cols = [a.column(gr, None) for a in ty.args]
        Fs = ty.line_fmt_str(seg.cpu)
        hs = [h.decode("utf-8", "surrogateescape") for h in hl]
        return [line.encode("utf-8", "surrogateescape")
                for line in map(Fs.__mod__, zip(hs, sl, ul, *cols))]

    def _mixed(self, seg: _Seg, ty: _Type, P: np.ndarray, gr: _Group, heads: np.ndarray,
               times: "_Times", codes: np.ndarray) -> list:
        """Some rows too short for bulk: render the good ones in bulk, the rest per event."""
        good = ~gr.bad
        sub = _Group.__new__(_Group)
        sub.n = int(good.sum())
        sub.bad = np.zeros(sub.n, bool)
        sub.cols = {k: (c[0], c[1][good]) for k, c in gr.cols.items()}
        res = np.empty(P.shape[0], dtype=object)
        res[good] = self._format(seg, ty, P[good], sub, heads, times)
        res[gr.bad] = self._slow_lines(seg, ty, P[gr.bad], codes, heads, times)
        return res.tolist()

    def _slow_lines(self, seg: _Seg, ty: _Type, P: np.ndarray, codes: np.ndarray,
                    heads: np.ndarray, times: "_Times") -> list:
        """The per-event renderer, for what bulk rendering does not cover."""
        self.counts["per_event"] += P.shape[0]
        b = seg.batch
        E = codes[P].tolist()
        data = memoryview(b.data)
        fmt = ty.fmt
        pre = self.prefix
        c = seg.cpu
        out = []
        hl = [h.decode("utf-8", "surrogateescape") for h in heads[P].tolist()]
        sl, ul = times.ints(P)
        if fmt is None:
            for h, s, u in zip(hl, sl, ul):
                out.append("%s%s [%03d] %5d.%06d: [UNKNOWN EVENT]" % (pre, h, c, s, u))
        else:
            col = event_name_column(getattr(fmt, "name", "") or "(NULL)")
            info = self.r.info
            bo, bl = b.offset, b.length
            for e, h, s, u in zip(E, hl, sl, ul):
                o = int(bo[e])
                p = data[o:o + int(bl[e])]
                out.append("%s%s [%03d] %5d.%06d: %s%s" % (pre, h, c, s, u, col, info(fmt, p)))
        return [line.encode("utf-8", "surrogateescape") for line in out]

    # -- comm learning ----------------------------------------------------------------
    def _registrations(self, seg: _Seg, ty: _Type, P: np.ndarray, codes: np.ndarray,
                       gr: Optional[_Group]) -> tuple:
        """(positions*2+k, pids, comms) this group registers, in its own order."""
        pairs = ty.reg
        if gr is not None and not gr.bad.any():
            pos, pids, names = [], [], []
            for k, (pf, cf) in enumerate(pairs):
                pos.append(P.astype(np.int64) * 2 + k)
                pids.append(gr.cols[pf][1].astype(np.int64))
                names.append(_objects(_materialize(gr.cols[cf])))
            return np.concatenate(pos), np.concatenate(pids), np.concatenate(names)
        # some payloads are short: read each as the plugin does (it registers only if
        # its read succeeds)
        read = ty.reg_read
        b = seg.batch
        data = memoryview(b.data)
        pos, pids, names = [], [], []
        for p, e in zip(P.tolist(), codes[P].tolist()):
            o = int(b.offset[e])
            try:
                v = read(data[o:o + int(b.length[e])])
            except Exception:  # noqa: BLE001 - the plugin's guard catches these too
                continue
            for k in range(len(pairs)):
                pos.append(p * 2 + k)
                pids.append(v[2 * k])
                names.append(v[2 * k + 1])
        return (np.array(pos, np.int64), np.array(pids, np.int64), _objects(names))

    def _learn(self, regs: list) -> Dict[int, int]:
        pos = np.concatenate([r[0] for r in regs])
        pids = np.concatenate([r[1] for r in regs])
        names = np.concatenate([r[2] for r in regs])
        order = np.argsort(pos, kind="stable")
        comms = self.comms
        newly: Dict[int, int] = {}
        for p, pid, name in zip(pos[order].tolist(), pids[order].tolist(), names[order].tolist()):
            if pid and pid not in comms:
                comms[pid] = name
                newly[pid] = p >> 1
        return newly

    def _heads(self, pid: np.ndarray, is_ev: np.ndarray, newly: Dict[int, int]) -> np.ndarray:
        u, inv = _unique_small(pid)
        comms = self.comms
        cache = self.heads
        final = np.empty(u.shape[0], dtype=object)
        before = None
        reg = None
        ul = u.tolist()
        for i, p in enumerate(ul):
            name = "<idle>" if p == 0 else comms.get(p, "<...>")
            h = cache.get((p, name))
            if h is None:
                h = cache[(p, name)] = _b("%16s-%-5d" % (name, p))
            final[i] = h
        if newly:
            before = final.copy()
            reg = np.full(u.shape[0], -1, np.int64)
            for i, p in enumerate(ul):
                if p in newly:
                    reg[i] = newly[p]
                    before[i] = _b("%16s-%-5d" % ("<...>", p))
            heads = final[inv]
            use_before = np.arange(pid.shape[0]) <= reg[inv]
            if use_before.any():
                heads[use_before] = before[inv][use_before]
            return heads
        return final[inv]

    def _strip_after_drop(self, out: np.ndarray, cpu: np.ndarray, is_ev: np.ndarray,
                          mk: np.ndarray) -> None:
        L = len(_b(self.prefix))
        todo = set(cpu[mk].tolist()) | self.after_drop
        for c in sorted(todo):
            idx = np.flatnonzero(cpu == c)
            if not idx.shape[0]:
                continue
            kinds = is_ev[idx]
            prev_marker = np.concatenate(([c in self.after_drop], ~kinds[:-1]))
            for p in idx[kinds & prev_marker].tolist():
                out[p] = out[p][L:]
            if kinds[-1]:
                self.after_drop.discard(c)
            else:
                self.after_drop.add(c)


class _Times:
    """The time column (``%5lu.%06lu`` of the rounded microseconds) of a render step.

    When every second count has the same printed width, the text is built with numpy
    digit arithmetic and formatted as one ``%s``; otherwise as two integers."""

    def __init__(self, ts: np.ndarray, cpu: np.ndarray):
        n = ts.shape[0]
        self.text: Optional[np.ndarray] = None
        if n and int(ts.max()) > M64 - 1000:
            us = np.array([(int(x) + 500) // 1000 for x in ts.tolist()], dtype=object)
            self.secs, self.usecs = us // 1000000, us % 1000000
            return
        us = (ts + _U64(500)) // _U64(1000)
        secs, usecs = us // _U64(1000000), us % _U64(1000000)
        self.secs, self.usecs = secs, usecs
        if not n:
            return
        lo, hi = len(str(int(secs.min()))), len(str(int(secs.max())))
        width = max(5, hi)
        if max(5, lo) != width or int(cpu.max()) > 999 or int(cpu.min()) < 0:
            return
        m = np.empty((n, width + 13), np.uint8)
        m[:, 0], m[:, 4], m[:, 5] = 91, 93, 32        # "[ddd] "
        c = cpu.astype(np.int64)
        for k in range(3):
            c, d = np.divmod(c, 10)
            m[:, 3 - k] = d + 48
        full = m
        m = full[:, 6:]
        m[:, width] = 46
        u = usecs.astype(np.uint32)
        ten = np.uint32(10)
        for k in range(6):
            u, d = np.divmod(u, ten)
            m[:, width + 6 - k] = d
        m[:, width + 1:] += 48
        s = secs
        ten64 = np.uint64(10)
        for k in range(width):
            if k and not s.any():
                m[:, :width - k] = 32
                break
            s, d = np.divmod(s, ten64)
            m[:, width - 1 - k] = d + 48
            if k:
                lead = (s == 0) & (d == 0)
                if lead.any():
                    m[lead, width - 1 - k] = 32
        self.text = full.view("S%d" % (width + 13)).reshape(n)

    def cols(self, P: np.ndarray) -> list:
        if self.text is not None:
            return [self.text[P].tolist()]
        return [self.secs[P].tolist(), self.usecs[P].tolist()]

    def ints(self, P: np.ndarray) -> Tuple[list, list]:
        return self.secs[P].tolist(), self.usecs[P].tolist()


def _objects(vals: list) -> np.ndarray:
    """A 1-D object array of ``vals`` (np.array would nest tuples and lists)."""
    if not vals or isinstance(vals[0], (str, bytes, int)):
        a = np.array(vals, dtype=object)
        if a.ndim == 1 and a.shape[0] == len(vals):
            return a
    out = np.empty(len(vals), dtype=object)
    for i, v in enumerate(vals):
        out[i] = v
    return out


def _unique_small(v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """np.unique(v, return_inverse=True) for ints, by counting when their range is small."""
    if v.shape[0]:
        lo, hi = int(v.min()), int(v.max())
        if hi - lo < max(1 << 16, 4 * v.shape[0]):
            x = v - lo
            seen = np.bincount(x, minlength=hi - lo + 1) > 0
            u = np.flatnonzero(seen)
            lut = np.zeros(seen.shape[0], np.intp)
            lut[u] = np.arange(u.shape[0])
            return u + lo, lut[x]
    u, inv = np.unique(v, return_inverse=True)
    return u, inv.reshape(-1)


def supported(trace: Any) -> bool:
    """Whether :class:`FastReport` renders this trace (else use the per-event path)."""
    return trace.source.endian in ("<", "little")


def report_blocks(trace: Any, buffer: Any, cpus: Optional[List[int]] = None) -> Iterator[bytes]:
    """UTF-8 blocks (each ending in a newline) of the report of one buffer, no header."""
    yield from FastReport(trace, buffer, cpus).blocks()


def _strip_trailing_newline(lines: list) -> list:
    """Drop one trailing newline per line, as trace-cmd does (trace_marker texts end in one).

    The per-event path does this in TextRenderer.info; here a joined probe finds out in
    C whether any line of the group needs it before paying for a Python-level pass.
    """
    if not lines or b"\n\x00" not in b"\x00".join(lines) + b"\x00":
        return lines
    return [ln[:-1] if ln.endswith(b"\n") else ln for ln in lines]
