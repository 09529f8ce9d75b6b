"""The seed's plain mode, end to end in a real TCG guest.

As in the 2012 README: the host `cat`s every data FIFO, and starts and stops the guest
agent with `echo 1` / `echo 0` into the control FIFO. The pages carry no formats, so the
guest's event formats come back over the lab's files port, and `vmtrace report
--formats` decodes the raw pages with them.
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from labguest import lab_image
from vmtrace.host.layout import prepare
from vmtrace.lab.qemu import Guest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST = r""". /lab/lib.sh
echo 1 > $T/events/sched/sched_switch/enable
echo 1 > $T/events/sched/sched_wakeup/enable
python3 /lab/agent.pyz > /tmp/agent.log 2>&1 &
AGENT=$!
sleep 3
echo 1 > $T/tracing_on
pingpong 1.5 > /tmp/score
echo 0 > $T/tracing_on
echo "score $(cat /tmp/score)"
echo "workload done"
sleep 3
lab_tracefs_meta /tmp/meta sched
cd /tmp && lab_send meta
kill $AGENT 2>/dev/null
wait $AGENT 2>/dev/null
"""


def _sh(cmd: str) -> None:
    subprocess.run(["sh", "-c", cmd], check=True, timeout=30)


def test_seed_plain_mode_echo_and_cat(tmp_path):
    img = lab_image()
    assert img.has_agent, "the lab image must carry the agent"
    lay = prepare("plain", 2, str(tmp_path / "guests"))
    raw = tmp_path / "raw"
    raw.mkdir()
    cats = [subprocess.Popen(["sh", "-c", f"exec cat {lay.cpu(c)}.out > {raw}/cpu{c}"])
            for c in range(2)]
    done = threading.Event()
    script = GUEST
    try:
        with Guest(img, script=script, qemu_args=lay.qemu_args(), smp=2, accel="tcg",
                   files_port=True,
                   on_line=lambda l: done.set() if l == "workload done" else None) as g:
            g.wait_ready(90)
            _sh(f"echo 1 > {lay.ctl}.in")
            assert done.wait(120), "\n".join(g.console[-20:])
            _sh(f"echo 0 > {lay.ctl}.in")
            assert g.wait_exit(120) == 0, "\n".join(g.console[-20:])
            lines = g.script_lines()
            meta = g.received_files(tmp_path / "files") / "meta"
        for c in cats:
            c.wait(30)
    finally:
        for c in cats:
            if c.poll() is None:
                c.kill()
                c.wait(5)
    score = [float(l.split()[1]) for l in lines if l.startswith("score ")]
    assert score and score[0] > 0
    sizes = {c: (raw / f"cpu{c}").stat().st_size for c in range(2)}
    assert sizes[0] + sizes[1] > 0 and all(s % 4096 == 0 for s in sizes.values()), sizes
    out = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "vmtrace"), "report",
                          str(raw), "--formats", str(meta)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [l for l in out.stdout.splitlines() if re.search(r"\[\d{3}\]\s+\d+\.\d+:", l)]
    assert len(events) > 100
    assert any("pingpong" in l and "sched_switch" in l for l in events)
    cpus = {int(re.search(r"\[(\d{3})\]", l).group(1)) for l in events}
    assert cpus <= {0, 1} and len(cpus) == 2
    stamps = [float(re.search(r"\]\s+(\d+\.\d+):", l).group(1)) for l in events]
    assert stamps == sorted(stamps)
    assert "DROPPED" not in out.stdout
