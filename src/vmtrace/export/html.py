"""A self-contained HTML timeline page: one file, no network, opens in any browser.

The model (:mod:`vmtrace.export.timeline`) is embedded as compact JSON: per lane flat
integer arrays (slices as gap-since-previous-end, duration, task index; instants as
time delta, name index, pid), a task table (comm, pid) with colours, and the legend.
At most :data:`MAX_INSTANTS` instants are shipped, evenly spread over the trace (lost
events always). A small canvas script draws one lane per host CPU and guest vCPU:
tasks as coloured slices (slices narrower than a pixel are merged into one column,
as high as the CPU was busy there), idle left empty, other events as ticks, lost
events in red. Wheel zooms, drag pans, hovering a slice shows comm-pid, CPU, start and
duration. When the drawing is done the script records what it drew in ``data-*``
attributes of <body> (``slices``: slices in view, ``rects``: rectangles painted), so
a headless browser test can verify the page drew its tracks, not just that it loaded.
"""
from __future__ import annotations

import html as _html
import json
import os
from typing import Any, Optional

import numpy as np

from vmtrace.export import Export
from vmtrace.export.timeline import LOST_COLOR, Timeline, model, write_png

MAX_INSTANTS = 20_000       # keeps pages for long traces small enough to open


FORMAT = Export("html", "a self-contained timeline page (one lane per host CPU and guest vCPU)",
                needs_file=True)


def write(source: Any, out: str, selection: Any) -> Optional[str]:
    """The registry's entry: the timeline page of the selection of ``source``."""
    what = "session " if source.kind == "session" else ""
    write_html(source, out, title="vmtrace %s%s" % (what, source.name), selection=selection)
    return "wrote the timeline page %s" % out


def write_html(events: Any, path: str, *, title: str = "vmtrace timeline", selection: Any = None) -> str:
    """Write the timeline of ``events`` (a path, a Source, or events) to ``path``."""
    tl = model(events, max_instants=None, selection=selection)
    return write_timeline_html(tl, path, title=title)


def _shipped_instants(tl: Timeline, cap: int) -> np.ndarray:
    """Indices of the instants to ship: all lost markers, the rest evenly spread."""
    n = len(tl.i_ts)
    lost = tl.lost_mask()
    if n <= cap:
        return np.arange(n)
    rest = np.nonzero(~lost)[0]
    pick = rest[np.unique(np.linspace(0, len(rest) - 1, max(cap, 1)).astype(np.int64))]
    return np.union1d(pick, np.nonzero(lost)[0])


def _payload(tl: Timeline, max_instants: int = MAX_INSTANTS) -> dict:
    t0 = tl.start
    n = len(tl.tracks)
    bounds = np.searchsorted(tl.s_track, np.arange(n + 1))
    busy = tl.busy()
    keep = _shipped_instants(tl, max_instants)
    i_track, i_ts = tl.i_track[keep], tl.i_ts[keep]
    i_name, i_pid, i_count = tl.i_name[keep], tl.i_pid[keep], tl.i_count[keep]
    i_lost = tl.lost_mask()[keep]
    lanes = []
    for r, t in enumerate(tl.tracks):
        a, b = bounds[r], bounds[r + 1]
        st, en = tl.s_start[a:b] - t0, tl.s_end[a:b] - t0
        gap = st - np.concatenate([[0], en[:-1]])
        s = np.stack([gap, en - st, tl.s_task[a:b].astype(np.int64)], axis=1).reshape(-1)
        m = (i_track == r) & ~i_lost
        its = i_ts[m] - t0
        dts = np.diff(np.concatenate([[0], its]))
        i = np.stack([dts, i_name[m].astype(np.int64), i_pid[m].astype(np.int64)], axis=1).reshape(-1)
        ml = (i_track == r) & i_lost
        lost = np.stack([i_ts[ml] - t0, i_count[ml]], axis=1).reshape(-1)
        lanes.append({"label": tl.track_label(t), "source": t[0], "kind": tl.kind(t[0]), "cpu": t[1],
                      "busy": round(busy[r], 4), "s": s.tolist(), "i": i.tolist(), "lost": lost.tolist()})
    return {"t0": t0, "span": max(tl.end - t0, 1), "events": tl.events, "clock": tl.clock,
            "lanes": lanes, "tasks": [[c, p] for p, c in tl.tasks], "colors": tl.task_colors(),
            "legend": [list(x) for x in tl.legend()], "names": list(tl.names),
            "instants": tl.instants_total, "shipped": int(np.count_nonzero(~i_lost)),
            "lost_color": LOST_COLOR}


def write_timeline_html(tl: Timeline, path: str, *, title: str = "vmtrace timeline") -> str:
    data = json.dumps(_payload(tl), separators=(",", ":"))
    # </script> inside JSON strings would end the script element early
    data = data.replace("</", "<\\/")
    page = _PAGE.replace("%TITLE%", _html.escape(title)).replace("%DATA%", data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>%TITLE%</title>
<style>
 body { margin: 0; font: 12px system-ui, sans-serif; background: #fafafa; color: #222; }
 header { padding: 6px 10px; background: #263238; color: #eceff1; }
 header b { margin-right: 1em; }
 #legend { padding: 4px 10px; background: #fff; border-bottom: 1px solid #ddd; line-height: 20px; }
 #legend span.k { display: inline-block; margin-right: 14px; white-space: nowrap; }
 #legend i { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; margin-right: 4px; }
 #wrap { position: relative; }
 canvas { display: block; }
 #tip { position: absolute; pointer-events: none; background: #fffde7; border: 1px solid #bbb;
        padding: 2px 5px; display: none; white-space: pre; }
</style></head>
<body>
<header><b>%TITLE%</b><span id="info"></span>
 <span style="float:right">wheel: zoom, drag: pan, double-click: reset</span></header>
<div id="legend"></div>
<div id="wrap"><canvas id="c"></canvas><div id="tip"></div></div>
<script id="data" type="application/json">%DATA%</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const LABEL_W = 170, LANE_H = 30, AXIS_H = 26;
const cv = document.getElementById("c"), ctx = cv.getContext("2d");
const tip = document.getElementById("tip");
let view = {a: 0, b: D.span};

// unpack the flat arrays: slices [gap, dur, task]..., instants [dt, name, pid]..., lost [t, count]...
for (const L of D.lanes) {
  const n = L.s.length / 3, S = new Float64Array(n), E = new Float64Array(n), K = new Int32Array(n);
  let t = 0;
  for (let j = 0; j < n; j++) { t += L.s[3 * j]; S[j] = t; t += L.s[3 * j + 1]; E[j] = t; K[j] = L.s[3 * j + 2]; }
  const m = L.i.length / 3, T = new Float64Array(m), N = new Int32Array(m), P = new Int32Array(m);
  t = 0;
  for (let j = 0; j < m; j++) { t += L.i[3 * j]; T[j] = t; N[j] = L.i[3 * j + 1]; P[j] = L.i[3 * j + 2]; }
  L.S = S; L.E = E; L.K = K; L.T = T; L.N = N; L.P = P;
  L.LT = L.lost.filter((v, j) => j % 2 === 0); L.LC = L.lost.filter((v, j) => j % 2 === 1);
  delete L.s; delete L.i;
}
function lower(arr, v) {      // first index with arr[i] >= v
  let lo = 0, hi = arr.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (arr[mid] < v) lo = mid + 1; else hi = mid; }
  return lo;
}
function fmt(ns) {
  if (Math.abs(ns) >= 1e9) return (ns / 1e9).toFixed(3) + " s";
  if (Math.abs(ns) >= 1e6) return (ns / 1e6).toFixed(3) + " ms";
  if (Math.abs(ns) >= 1e3) return (ns / 1e3).toFixed(1) + " us";
  return ns.toFixed(0) + " ns";
}
function task(k) { return D.tasks[k][0] + "-" + D.tasks[k][1]; }
(function legend() {
  const el = document.getElementById("legend");
  const total = D.legend.reduce((a, x) => a + x[2], 0) || 1;
  const add = (colour, text) => {
    const s = document.createElement("span"); s.className = "k";
    const i = document.createElement("i"); i.style.background = colour;
    s.appendChild(i); s.appendChild(document.createTextNode(text)); el.appendChild(s);
  };
  for (const [label, colour, ns] of D.legend)
    add(colour, label + " " + fmt(ns) + " (" + (100 * ns / total).toFixed(0) + "%)");
  add("rgba(38,50,56,0.6)", "other events: " + D.instants +
      (D.shipped < D.instants ? " (" + D.shipped + " shown as ticks)" : ""));
  const lost = D.lanes.reduce((a, L) => a + L.LT.length, 0);
  if (lost) add(D.lost_color, "lost events: " + lost + " markers, " +
                D.lanes.reduce((a, L) => a + L.LC.reduce((x, c) => x + Math.max(c, 0), 0), 0) + " events");
  add("#fff", "empty = idle");
})();

function size() {
  cv.width = Math.max(window.innerWidth, 400);
  cv.height = AXIS_H + D.lanes.length * LANE_H + 10;
}
function W() { return cv.width - LABEL_W - 10; }
function x(t) { return LABEL_W + (t - view.a) / (view.b - view.a) * W(); }
function t_of(px) { return view.a + (px - LABEL_W) / W() * (view.b - view.a); }
function draw() {
  let slices = 0, rects = 0, ticks = 0;
  ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, cv.width, cv.height);
  ctx.font = "11px sans-serif"; ctx.textBaseline = "middle";
  ctx.fillStyle = "#555"; ctx.strokeStyle = "#ddd";
  // a 1-2-5 step that leaves about 110 px between labels
  const want = (view.b - view.a) / Math.max(W() / 110, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(want || 1)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(v => v >= want) || 10 * mag;
  for (let t = Math.ceil(view.a / step) * step; t <= view.b; t += step) {
    const px = x(t);
    ctx.beginPath(); ctx.moveTo(px, AXIS_H - 4); ctx.lineTo(px, cv.height); ctx.stroke();
    ctx.fillText(fmt(t).replace(/\.(\d*?)0+ /, (m, d) => d ? "." + d + " " : " "), px + 2, AXIS_H / 2);
  }
  const ns_px = (view.b - view.a) / W(), top = 4, hmax = LANE_H - 11;
  D.lanes.forEach((L, li) => {
    const y = AXIS_H + li * LANE_H;
    ctx.fillStyle = li % 2 ? "#f3f5f7" : "#fff"; ctx.fillRect(LABEL_W, y, cv.width, LANE_H);
    // slices; those narrower than a pixel are merged into runs of at most 2 px, drawn in
    // the colour of their longest slice and as high as the CPU was busy in the run
    let run = null;
    const flush = () => {
      if (!run) return;
      const w = Math.max(run.x1 - run.x0, 1), busy = Math.min(run.busy / Math.max(run.x1 - run.x0, 1) / ns_px, 1);
      const h = Math.max(hmax * busy, 2);
      ctx.fillStyle = D.colors[run.k]; ctx.fillRect(run.x0, y + top + hmax - h, w, h); rects++; run = null;
    };
    for (let j = lower(L.E, view.a); j < L.S.length && L.S[j] <= view.b; j++) {
      slices++;
      const x0 = Math.max(x(L.S[j]), LABEL_W), x1 = Math.min(x(L.E[j]), cv.width), d = L.E[j] - L.S[j];
      if (x1 - x0 >= 1) {
        flush();
        ctx.fillStyle = D.colors[L.K[j]]; ctx.fillRect(x0, y + top, x1 - x0, hmax); rects++;
        if (x1 - x0 > 50) {
          ctx.fillStyle = "#fff"; ctx.fillText(task(L.K[j]), x0 + 3, y + top + hmax / 2, x1 - x0 - 6);
        }
        continue;
      }
      if (run && (x0 - run.x1 >= 1 || x1 - run.x0 > 2)) flush();
      if (!run) run = {x0: x0, x1: x1, busy: 0, k: L.K[j], kd: 0};
      run.x1 = Math.max(run.x1, x1); run.busy += d;
      if (d > run.kd) { run.kd = d; run.k = L.K[j]; }
    }
    flush();
    ctx.fillStyle = "rgba(38,50,56,0.55)";
    let lastpx = -1;
    for (let j = lower(L.T, view.a); j < L.T.length && L.T[j] <= view.b; j++) {
      const px = Math.floor(x(L.T[j]));
      if (px !== lastpx) { ctx.fillRect(px, y + LANE_H - 6, 1, 4); lastpx = px; }
      ticks++;
    }
    ctx.fillStyle = D.lost_color; ctx.strokeStyle = D.lost_color;
    for (let j = 0; j < L.LT.length; j++) {
      if (L.LT[j] < view.a || L.LT[j] > view.b) continue;
      const px = x(L.LT[j]);
      ctx.fillRect(px - 0.5, y + 2, 1.5, LANE_H - 4);
      ctx.beginPath(); ctx.moveTo(px - 4, y + 1); ctx.lineTo(px + 4, y + 1); ctx.lineTo(px, y + 7); ctx.fill();
    }
    ctx.strokeStyle = "#ddd";
    ctx.fillStyle = "#eceff1"; ctx.fillRect(0, y, LABEL_W, LANE_H);
    ctx.fillStyle = L.kind === "host" ? "#1a237e" : "#1b5e20";
    ctx.fillText(L.label, 6, y + LANE_H / 2 - 6);
    ctx.fillStyle = "#607d8b";
    ctx.fillText((100 * L.busy).toFixed(0) + "% busy", 6, y + LANE_H / 2 + 7);
  });
  document.body.dataset.tracks = D.lanes.length;
  document.body.dataset.slices = slices;
  document.body.dataset.rects = rects;
  document.body.dataset.ticks = ticks;
  document.body.dataset.drawn = "yes";
  document.getElementById("info").textContent =
    D.lanes.length + " tracks, " + D.events + " events, showing " + fmt(view.b - view.a) + " (" + D.clock + ")";
}
function hit(px, py) {
  const li = Math.floor((py - AXIS_H) / LANE_H);
  if (li < 0 || li >= D.lanes.length || px < LABEL_W) return null;
  const t = t_of(px), L = D.lanes[li], slack = (view.b - view.a) / W() * 3;
  for (let j = 0; j < L.LT.length; j++) if (Math.abs(L.LT[j] - t) < slack)
    return "lost events" + (L.LC[j] >= 0 ? ": " + L.LC[j] : "") + "\n" + L.label + "\nat +" + fmt(L.LT[j]);
  // the slice under the pointer, else the nearest within 3 px
  let best = -1, dist = slack;
  const j0 = lower(L.E, t - slack);
  for (let j = j0; j < L.S.length && L.S[j] <= t + slack; j++) {
    const d = t < L.S[j] ? L.S[j] - t : (t > L.E[j] ? t - L.E[j] : 0);
    if (d < dist || (d === 0 && best < 0)) { dist = d; best = j; if (d === 0) break; }
  }
  if (best >= 0)
    return task(L.K[best]) + "\n" + L.label + "\nstart +" + fmt(L.S[best]) + "\nduration " + fmt(L.E[best] - L.S[best]);
  const k = lower(L.T, t - slack);
  if (k < L.T.length && Math.abs(L.T[k] - t) < slack)
    return D.names[L.N[k]] + "  pid " + L.P[k] + "\n" + L.label + "\nat +" + fmt(L.T[k]);
  return null;
}
let drag = null;
cv.addEventListener("wheel", ev => {
  ev.preventDefault();
  const t = t_of(ev.offsetX), k = ev.deltaY > 0 ? 1.25 : 0.8;
  view = {a: t - (t - view.a) * k, b: t + (view.b - t) * k}; draw();
}, {passive: false});
cv.addEventListener("mousedown", ev => { drag = {x: ev.offsetX, v: {...view}}; });
window.addEventListener("mouseup", () => { drag = null; });
cv.addEventListener("mousemove", ev => {
  if (drag) {
    const dt = (ev.offsetX - drag.x) / W() * (drag.v.b - drag.v.a);
    view = {a: drag.v.a - dt, b: drag.v.b - dt}; draw(); return;
  }
  const h = hit(ev.offsetX, ev.offsetY);
  tip.style.display = h ? "block" : "none";
  if (h) { tip.textContent = h; tip.style.left = (ev.offsetX + 12) + "px"; tip.style.top = (ev.offsetY + 12) + "px"; }
});
cv.addEventListener("dblclick", () => { view = {a: 0, b: D.span}; draw(); });
window.addEventListener("resize", () => { size(); draw(); });
size(); draw();
</script>
</body></html>
"""


def write_timeline(x: Any, png_path: Optional[str] = None,
                   html_path: Optional[str] = None, *, title: str = "vmtrace timeline",
                   selection: Any = None) -> Timeline:
    """Write the per-CPU scheduling timeline of a path, Source or events as PNG and/or a
    self-contained HTML page."""
    tl = model(x, selection=selection)
    if png_path:
        write_png(tl, png_path, title=title)
    if html_path:
        write_timeline_html(tl, html_path, title=title)
    return tl
