"""A user's copy of vmtrace stands alone: built into a wheel from a copy of the checkout
with nothing beside it, installed into a directory of its own, and run from another empty
directory, `vmtrace demo` and `vmtrace bench overhead --quick` work.

This guards against any code path that reads files relative to the source tree or beside
the checkout (as the benchmarks' peers once did): only what the wheel carries is there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from paths import ROOT



def _checkout_files() -> list[str]:
    """The files a clone has: git's list when this is a git checkout, else the tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(env, cwd, vmtrace executable) of a wheel installed alone, away from the checkout."""
    base = tmp_path_factory.mktemp("alone")
    clone = base / "clone" / "vmtrace"          # its parent holds nothing but it
    for rel in _checkout_files():
        if rel.startswith(("src/", "pyproject.toml", "setup.py", "README.md")) and not rel.endswith(".so"):
            dst = clone / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst)
    wheels = base / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(clone)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("vmtrace-*.whl")
    target = base / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-2000:]
    shutil.rmtree(clone.parent)                 # nothing of the source is left to find
    cwd = base / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMTRACE_BENCH_PEERS", "PYTHONPATH"))}
    # The wheel's copy comes first on the path, before the checkout's editable install;
    # caches start empty so nothing built from the checkout is reused.
    env.update(PYTHONPATH=str(target), XDG_CACHE_HOME=str(base / "cache"), VMTRACE_CACHE=str(base / "cache"))
    where = subprocess.run([sys.executable, "-c", "import vmtrace; print(vmtrace.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    return env, cwd, [sys.executable, "-m", "vmtrace"]


def test_wheel_carries_the_peer_sources(installed):
    env, cwd, _ = installed
    target = Path(env["PYTHONPATH"])
    assert sorted(p.name for p in (target / "vmtrace" / "lab" / "csrc").glob("*.c")) == [
        "intloop.c", "pingpong.c", "seedlike-agent.c"]


@pytest.mark.vm
@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_demo_runs_from_an_empty_directory(installed):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86 (make test installs it)")
    env, cwd, vmtrace = installed
    run = subprocess.run([*vmtrace, "demo", "--seconds", "2", "-o", "out", "--accel", "tcg"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-2000:]
    rep = subprocess.run(["trace-cmd", "report", "-i", str(cwd / "out" / "demo.dat")],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and rep.stdout.startswith("cpus=2\n"), rep.stderr[-500:]
    assert "pingpong-" in rep.stdout


@pytest.mark.tracefs
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_bench_overhead_quick_runs_from_an_empty_directory(installed):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc (make test installs it)")
    env, cwd, vmtrace = installed
    run = subprocess.run([*vmtrace, "bench", "overhead", "--quick", "--out", "b"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-2000:]
    doc = json.loads((cwd / "b" / "overhead.json").read_text())
    assert not doc["skipped"], doc["skipped"]
    for wname, w in doc["workloads"].items():
        cols = w["collectors"]
        assert {"native", "vmtrace", "seedlike"} <= set(cols), (wname, sorted(cols))
        assert all(s > 0 for c in cols.values() for s in c["scores"]), wname
        assert cols["seedlike"]["bytes"]["min"] > 0, wname      # the peer really moved pages
