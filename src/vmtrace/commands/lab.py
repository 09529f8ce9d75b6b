"""`vmtrace lab build|run`: the small real guest that the demo and end-to-end tests boot."""
from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

import click

from vmtrace.errors import VmtraceError

WORKLOADS = ("pingpong", "intloop")


def _progress(msg: str) -> None:
    click.echo(f"lab: {msg}", err=True)


@click.group("lab")
def command() -> None:
    """Build and boot the small QEMU guest (busybox, the host's Python, the agent)."""


@command.command("build")
@click.option("--python", "python", default=None, help="Interpreter to copy in (default /usr/bin/python3).")
@click.option("--kernel", default=None, help="vmlinuz to boot (default: newest Debian cloud kernel).")
@click.option("--force", is_flag=True, help="Rebuild even if a cached image matches.")
def build(python: str | None, kernel: str | None, force: bool) -> None:
    """Build the guest image, or reuse the cached one built from the same inputs."""
    from vmtrace.lab.image import build_image
    img = build_image(python=python, kernel=kernel, force=force, progress=_progress)
    click.echo(f"kernel  {img.kernel}")
    click.echo(f"initrd  {img.initrd}")
    click.echo(f"agent   {img.manifest.get('agent') or 'not included (vmtrace agent --export unavailable)'}")


@command.command("run")
@click.option("--workload", type=click.Choice(WORKLOADS), default="pingpong", show_default=True)
@click.option("--seconds", type=float, default=3.0, show_default=True, help="How long the workload runs.")
@click.option("--cmd", "cmd", default=None, help="Shell command to run in the guest instead of the workload.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True)
@click.option("--smp", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--memory", "memory_mb", type=click.IntRange(128, 65536), default=512, show_default=True)
@click.option("--dir", "base", default=None, help="Where to prepare the guest's ports (default: a temp dir).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Give up after this many seconds.")
@click.option("--console-log", type=click.Path(dir_okay=False), default=None, help="Also write the console here.")
def run(workload: str, seconds: float, cmd: str | None, accel: str, smp: int, memory_mb: int,
        base: str | None, timeout: float, console_log: str | None) -> None:
    """Boot the guest wired like `vmtrace prepare`, run a workload (or --cmd), power off.

    The exit status is the guest command's. Its console output is streamed as it comes.
    """
    from vmtrace.host.layout import prepare
    from vmtrace.lab.image import build_image
    from vmtrace.lab.qemu import Guest, resolve_accel

    if seconds <= 0:
        raise VmtraceError("--seconds must be positive")
    script = cmd if cmd is not None else f"{workload} {shlex.quote(str(seconds))}"
    img = build_image(progress=_progress)
    acc = resolve_accel(img, accel)
    with tempfile.TemporaryDirectory(prefix="vmtrace-lab-") as tmp:
        lay = prepare("lab", smp, base or tmp)
        _progress(f"booting ({acc}, {smp} vCPU, ports in {lay.path})")
        with Guest(img, script=script, qemu_args=lay.qemu_args(), smp=smp, memory_mb=memory_mb,
                   accel=acc, console_log=Path(console_log) if console_log else None,
                   on_line=lambda l: click.echo(l)) as g:
            ready = g.wait_ready(min(timeout, 120))
            _progress(f"guest up: {ready.get('cpus')} CPUs, {ready.get('ports')} virtio ports, "
                      f"kernel {ready.get('kernel')}")
            rc = g.wait_exit(timeout)
            _progress(f"guest command exited with status {rc}; powered off after {g.result().seconds} s")
    if rc:
        # cli.main ignores the code click returns from ctx.exit(); SystemExit carries it.
        raise SystemExit(rc)
