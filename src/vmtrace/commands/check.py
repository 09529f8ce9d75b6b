"""`vmtrace check SESSION_DIR`: prove the merged timeline by causality.

Prints, per guest, what was checked and the estimated sync error, then ``N violations``.
Exit status 0 when there are none, 1 when there are (the check ran and failed), 2 for
bad input. ``--skew-ns`` shifts every guest on purpose, to see the check fail.
"""
from __future__ import annotations

import json
import sys

import click

from vmtrace.errors import VmtraceError

MAX_SHOWN = 10


def _us(ns) -> str:
    return "-" if ns is None else "%.1f us" % (ns / 1000.0)


def _evidence_lines(r) -> list:
    """What the method worked from, one line per kind of evidence."""
    if r.method == "ptp":
        return ["method ptp: %d time probes (host send/receive around the guest's marker), %d used, %d windows"
                % (r.probes, r.used, r.segments)]
    if r.method != "tcg" or not r.evidence:
        return ["method %s" % r.method]
    e = r.evidence
    out = ["method tcg: guest x86-tsc = host TSC + one offset per segment; vCPU threads %s from %s" % (
               ",".join("%s:%s" % kv for kv in e["vcpu_threads"].items()), e["vcpu_map_from"] or "?"),
           "  guest side: %d events of the vCPUs, %d placed, %d outliers, %d unexplained" % (
               e["guest_events"], e["guest_events_used"], e["outliers"], e["unexplained"]),
           "  host side: %d scheduler records of the vCPU threads, %d trusted off-CPU gaps (%d dropped: "
           "lost switch-in or thread active), %d TSC anchors (bound %s)" % (
               e["host_records"], e["host_gaps"], e["host_gaps_dropped"], e["anchors"], _us(e["anchor_bound_ns"]))]
    for i, sg in enumerate(e["segments"]):
        out.append("  segment %d: guest ts %d..%d, %d events, offset band %.2f us" % (
            i + 1, sg["first_guest_ts"], sg["last_guest_ts"], sg["events"], sg["band_ns"] / 1000.0))
    return out


@click.command("check")
@click.argument("session_dir", type=click.Path(file_okay=False))
@click.option("--guest", "guests", multiple=True, help="Check only this guest (repeatable).")
@click.option("--skew-ns", type=int, default=0, show_default=True,
              help="Add this offset to every guest's mapped time (a deliberate error).")
@click.option("--holdout/--no-holdout", default=True, show_default=True,
              help="Also refit on every other probe and check the probes left out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def command(session_dir: str, guests: tuple, skew_ns: int, holdout: bool, as_json: bool) -> None:
    """Verify that every probe's guest marker (and every start/stop) lies between the
    host's send and receipt on the merged timeline."""
    from vmtrace.clocksync import causality
    from vmtrace.session import Session

    s = Session(session_dir)
    names = list(guests) or s.guests
    for n in names:
        if n in s.skipped:
            raise VmtraceError("guest %s has no trace.dat in %s: %s" % (n, session_dir, s.skipped[n]))
        s.source(n)
    if not names:
        click.echo("no guests in %s: nothing to check" % session_dir)
        click.echo("0 violations")
        return
    main = causality.check_session(s, skew_ns=skew_ns, guests=names)
    held = None
    if holdout:
        held = {}
        for n in names:
            if len(s.probe_markers(n)) >= 4 or (s.source(n).sync or {}).get("method") == "tcg":
                held[n] = causality.check_guest(s, n, skew_ns=skew_ns, holdout=True)
    total = len(main.violations) + sum(len(g.violations) for g in (held or {}).values())
    if as_json:
        out = {"violations": total, "guests": {}, "skipped": dict(s.skipped) if not guests else {}}
        for n, g in main.guests.items():
            r = g.report
            out["guests"][n] = {
                "probes_checked": g.probes_checked, "orders_checked": g.orders_checked,
                "events_checked": g.events_checked,
                "violations": [str(v) for v in g.violations], "margin_ns": g.margin_ns,
                "method": r.method if r else None, "error_ns": r.error_ns if r else None,
                "max_error_ns": r.max_error_ns if r else None, "rtt_median_ns": r.rtt_median_ns if r else None,
                "drift_ppm": r.drift_ppm if r else None, "notes": g.notes + (r.notes if r else []),
                "segments": r.segments if r else None, "evidence": r.evidence if r else None,
                "holdout": None if not held or n not in held else {
                    "probes_checked": held[n].probes_checked, "events_checked": held[n].events_checked,
                    "violations": [str(v) for v in held[n].violations]},
            }
        click.echo(json.dumps(out))
    else:
        for n, g in main.guests.items():
            r = g.report
            line = "%s: %d probes and %d order bounds checked%s, %d violations" % (
                n, g.probes_checked, g.orders_checked,
                " and %d guest events inside their vCPU thread's running time" % g.events_checked
                if g.events_checked else "", len(g.violations))
            if r is not None and r.method == "ptp":
                line += "; sync error %s (worst window %s; %d probes, median round trip %s, drift %.2f ppm)" % (
                    _us(r.error_ns), _us(r.max_error_ns), r.probes, _us(r.rtt_median_ns), r.drift_ppm)
            elif r is not None and r.method == "tcg":
                line += "; sync error bound %s (median segment %s)" % (_us(r.max_error_ns), _us(r.error_ns))
            elif r is not None:
                line += "; method %s" % r.method
            if held and n in held:
                h = held[n]
                line += "; hold-out: %d violations on %d probes" % (len(h.violations), h.probes_checked) + (
                    " and %d guest events" % h.events_checked if h.events_checked else "")
            click.echo(line)
            if r is not None:
                for ev_line in _evidence_lines(r):
                    click.echo("  " + ev_line)
            for note in g.notes + (r.notes if r is not None else []):
                click.echo("  note: " + note)
            shown = g.violations + (held[n].violations if held and n in held else [])
            for v in shown[:MAX_SHOWN]:
                click.echo("  violation: %s" % v)
            if len(shown) > MAX_SHOWN:
                click.echo("  ... %d more" % (len(shown) - MAX_SHOWN))
        if not guests:
            for n, why in s.skipped.items():
                click.echo("%s: not checked, no trace.dat (%s)" % (n, why))
        if skew_ns:
            click.echo("(every guest deliberately shifted by %d ns)" % skew_ns)
        click.echo("%d violations" % total)
    if total:
        # SystemExit, not click's Exit: the CLI's main() maps click's Exit in
        # non-standalone mode to status 0, and a failed check must not look like a pass.
        sys.stdout.flush()
        raise SystemExit(1)
