"""A self-contained HTML timeline page: one file, no network, opens in any browser.

The data (tracks, slices, instants) is embedded as JSON with times relative to the
first event, and a small canvas script draws it: one lane per host CPU and guest vCPU,
tasks as coloured slices, other events as ticks. Wheel zooms, drag pans, hovering
names the task or event. When the drawing is done the script records what it drew in
``data-*`` attributes of <body>, so a headless browser test can verify the page drew
its tracks, not just that it loaded.
"""
from __future__ import annotations

import html as _html
import json
import os
from typing import Any, Iterable

from vmtrace.export.timeline import Timeline, build, color_of, events_of

MAX_INSTANTS = 50_000       # keeps pages for long traces small enough to open


def write_html(events: Iterable[Any], path: str, *, title: str = "vmtrace timeline") -> str:
    """Write the timeline of ``events`` (a session dir, trace, or events) to ``path``."""
    tl = build(events_of(events), max_instants=MAX_INSTANTS)
    return write_timeline_html(tl, path, title=title)


def _payload(tl: Timeline) -> dict:
    comms: dict = {}
    names: dict = {}

    def idx(table: dict, key: str) -> int:
        if key not in table:
            table[key] = len(table)
        return table[key]

    t0 = tl.start
    row = {t: i for i, t in enumerate(tl.tracks)}
    lanes = [{"label": tl.track_label(t), "source": t[0], "cpu": t[1], "s": [], "i": []} for t in tl.tracks]
    for s in tl.slices:
        lanes[row[s.track]]["s"].append([s.start - t0, s.end - s.start, idx(comms, s.comm), s.pid])
    for i in tl.instants:
        lanes[row[i.track]]["i"].append([i.ts - t0, idx(names, i.name), i.pid])
    comm_list = sorted(comms, key=comms.get)
    return {"t0": t0, "span": max(tl.end - t0, 1), "events": tl.events, "lanes": lanes,
            "comms": comm_list, "colors": [color_of(c) for c in comm_list],
            "names": sorted(names, key=names.get)}


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
 #wrap { position: relative; }
 canvas { display: block; }
 #tip { position: absolute; pointer-events: none; background: #fffde7; border: 1px solid #bbb;
        padding: 2px 5px; display: none; white-space: pre; }
</style></head>
<body>
<header><b>%TITLE%</b><span id="info"></span>
 <span style="float:right">wheel: zoom, drag: pan, double-click: reset</span></header>
<div id="wrap"><canvas id="c"></canvas><div id="tip"></div></div>
<script id="data" type="application/json">%DATA%</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const LABEL_W = 150, LANE_H = 24, AXIS_H = 26;
const cv = document.getElementById("c"), ctx = cv.getContext("2d");
const tip = document.getElementById("tip");
let view = {a: 0, b: D.span};

function size() {
  cv.width = Math.max(window.innerWidth, 400);
  cv.height = AXIS_H + D.lanes.length * LANE_H + 10;
}
function x(t) { return LABEL_W + (t - view.a) / (view.b - view.a) * (cv.width - LABEL_W - 10); }
function t_of(px) { return view.a + (px - LABEL_W) / (cv.width - LABEL_W - 10) * (view.b - view.a); }
function fmt(ns) {
  if (Math.abs(ns) >= 1e9) return (ns / 1e9).toFixed(3) + " s";
  if (Math.abs(ns) >= 1e6) return (ns / 1e6).toFixed(3) + " ms";
  if (Math.abs(ns) >= 1e3) return (ns / 1e3).toFixed(1) + " us";
  return ns.toFixed(0) + " ns";
}
function draw() {
  let slices = 0, ticks = 0;
  ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, cv.width, cv.height);
  ctx.font = "11px sans-serif"; ctx.textBaseline = "middle";
  // time axis
  ctx.fillStyle = "#555"; ctx.strokeStyle = "#ddd";
  // a 1-2-5 step that leaves about 110 px between labels
  const want = (view.b - view.a) / Math.max((cv.width - LABEL_W) / 110, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(want || 1)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(v => v >= want) || 10 * mag;
  for (let t = Math.ceil(view.a / step) * step; t <= view.b; t += step) {
    const px = x(t);
    ctx.beginPath(); ctx.moveTo(px, AXIS_H - 4); ctx.lineTo(px, cv.height); ctx.stroke();
    ctx.fillText(fmt(t), px + 2, AXIS_H / 2);
  }
  D.lanes.forEach((lane, i) => {
    const y = AXIS_H + i * LANE_H;
    ctx.fillStyle = i % 2 ? "#f3f5f7" : "#fff"; ctx.fillRect(LABEL_W, y, cv.width, LANE_H);
    for (const s of lane.s) {
      if (s[0] + s[1] < view.a || s[0] > view.b) continue;
      const x0 = Math.max(x(s[0]), LABEL_W), x1 = x(s[0] + s[1]);
      ctx.fillStyle = D.colors[s[2]];
      ctx.fillRect(x0, y + 3, Math.max(x1 - x0, 1), LANE_H - 8);
      if (x1 - x0 > 40) {
        ctx.fillStyle = "#fff"; ctx.fillText(D.comms[s[2]], x0 + 3, y + LANE_H / 2 - 1, x1 - x0 - 6);
      }
      slices++;
    }
    ctx.fillStyle = "rgba(0,0,0,0.55)";
    for (const e of lane.i) {
      if (e[0] < view.a || e[0] > view.b) continue;
      ctx.fillRect(x(e[0]), y + LANE_H - 5, 1, 4); ticks++;
    }
    ctx.fillStyle = "#eceff1"; ctx.fillRect(0, y, LABEL_W, LANE_H);
    ctx.fillStyle = lane.source === "host" ? "#1a237e" : "#1b5e20";
    ctx.fillText(lane.label, 6, y + LANE_H / 2);
  });
  document.body.dataset.tracks = D.lanes.length;
  document.body.dataset.slices = slices;
  document.body.dataset.ticks = ticks;
  document.body.dataset.drawn = "yes";
  document.getElementById("info").textContent =
    D.lanes.length + " tracks, " + D.events + " events, showing " + fmt(view.b - view.a);
}
function hit(px, py) {
  const i = Math.floor((py - AXIS_H) / LANE_H);
  if (i < 0 || i >= D.lanes.length || px < LABEL_W) return null;
  const t = t_of(px), lane = D.lanes[i], slack = (view.b - view.a) / cv.width * 3;
  for (const e of lane.i) if (Math.abs(e[0] - t) < slack)
    return lane.label + "\n" + D.names[e[1]] + "  pid " + e[2] + "\n+" + fmt(e[0]);
  for (const s of lane.s) if (s[0] <= t && t <= s[0] + s[1])
    return lane.label + "\n" + D.comms[s[2]] + ":" + s[3] + "  " + fmt(s[1]) + "\n+" + fmt(s[0]);
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
    const dt = (ev.offsetX - drag.x) / (cv.width - LABEL_W - 10) * (drag.v.b - drag.v.a);
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
