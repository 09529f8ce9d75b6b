"""``vmtrace agent``: a pass-through to the agent's own argparse front end.

The agent must also run alone in a guest (zipapp, standard library only), so its options
live in ``vmtrace.agent.__main__``; click only forwards the arguments untouched.
"""
from __future__ import annotations

import sys

import click


@click.command(
    "agent",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(args: "tuple[str, ...]") -> None:
    """Guest agent: splice ftrace pages to the host (see `vmtrace agent --help`)."""
    from vmtrace.agent.__main__ import main

    code = main(list(args))
    if code:
        sys.exit(code)
