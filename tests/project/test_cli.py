"""The CLI front: lazy commands, exit codes, one-line errors."""
from __future__ import annotations

import subprocess
import sys

import click

from vmtrace import cli


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmtrace", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_registered_command():
    out = run("--help")
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_ctx_exit_code_is_kept(monkeypatch):
    @click.command()
    @click.pass_context
    def fails(ctx):
        ctx.exit(3)

    monkeypatch.setitem(cli.COMMANDS, "fails", ("tests_fake", "x"))
    monkeypatch.setattr(cli.LazyGroup, "get_command", lambda self, ctx, name: fails if name == "fails" else None)
    assert cli.main(["fails"]) == 3


def test_input_error_is_one_line_exit_2(tmp_path):
    out = run("report", str(tmp_path / "missing.dat"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "missing.dat" in lines[0]


def test_unknown_command_is_a_usage_error():
    out = run("frobnicate")
    assert out.returncode == 2 and "Traceback" not in out.stderr
