"""The `vmtrace` command: a thin, lazily-loaded front for the subcommands.

Each subcommand lives in ``vmtrace.commands.<name>`` and exposes a click command named
``command``. Loading them lazily keeps ``vmtrace --help`` and ``vmtrace agent`` fast and
keeps numpy/pyarrow out of processes that do not need them. A VmtraceError anywhere
becomes one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from vmtrace.errors import VmtraceError

# name -> (module, one-line help shown in `vmtrace --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("vmtrace.commands.agent", "Guest agent: splice ftrace pages to the host."),
    "prepare": ("vmtrace.commands.prepare", "Make a guest's FIFOs/sockets and print QEMU or libvirt options."),
    "record": ("vmtrace.commands.record", "Record one or more guests (and the host) into trace.dat files."),
    "report": ("vmtrace.commands.report", "Decode a trace.dat, raw directory or session and print it."),
    "check": ("vmtrace.commands.check", "Verify a merged session's clock sync by causality."),
    "sql": ("vmtrace.commands.sql", "Run SQL (DuckDB) over a session's events or a fleet dataset."),
    "export": ("vmtrace.commands.export", "Append sessions to a Parquet dataset partitioned by host, guest, date."),
    "lab": ("vmtrace.commands.lab", "Build and boot the small QEMU test guest."),
    "demo": ("vmtrace.commands.demo", "Boot a real guest, trace it, and show the result."),
    "bench": ("vmtrace.commands.bench", "Overhead, decode and drain benchmarks against reference peers."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str):
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        try:
            module = importlib.import_module(entry[0])
        except ModuleNotFoundError as exc:
            if exc.name == entry[0]:
                return None
            raise
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmtrace")
def cli() -> None:
    """vmtrace: see inside your virtual machines with ftrace, at almost no cost to them."""


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of exiting.
        rv = cli.main(args=argv, prog_name="vmtrace", standalone_mode=False)
    except VmtraceError as exc:
        print(f"vmtrace: error: {exc}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("vmtrace: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("vmtrace: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `vmtrace report ... | head`: the reader left; that is not an error.
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 0
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
