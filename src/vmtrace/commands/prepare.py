"""`vmtrace prepare`: make a guest's ports (its transport's FIFOs or sockets) and print how to wire QEMU to them."""
from __future__ import annotations

import shlex

import click

from vmtrace.host.layout import prepare
from vmtrace.host.transport import transport_names


@click.command("prepare")
@click.argument("guest")
@click.option("--cpus", type=int, required=True, help="Number of vCPUs (one data port each).")
@click.option("--dir", "base", default=None, help="Parent directory (default /var/lib/vmtrace as root).")
@click.option("--transport", type=click.Choice(transport_names()), default="fifo", show_default=True)
@click.option("--group", default=None, help="Group QEMU runs as (default: qemu, libvirt-qemu or kvm).")
@click.option("--libvirt", is_flag=True, help="Print <channel> elements for a libvirt domain instead.")
def command(guest: str, cpus: int, base: str | None, transport: str, group: str | None, libvirt: bool) -> None:
    """Create GUEST's directory of ports and print the QEMU options (or libvirt XML)."""
    lay = prepare(guest, cpus, base, transport, group)
    if libvirt:
        click.echo(lay.libvirt_xml(), nl=False)
        return
    click.echo("# %s: %d CPU port(s), %s, group %s, in %s" % (lay.name, lay.cpus, transport, lay.group, lay.path))
    args = lay.qemu_args()
    lines = [" ".join(shlex.quote(a) for a in args[i:i + 2]) for i in range(0, len(args), 2)]
    click.echo(" \\\n".join(lines))
