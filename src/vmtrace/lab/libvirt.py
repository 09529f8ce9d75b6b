"""A libvirt domain for the lab guest, with the channels from `vmtrace prepare --libvirt`.

This is how we show that the prepared XML works in a real libvirt: the domain is a
plain `<domain type='qemu'>` (TCG) that boots the lab kernel and initramfs directly,
and its `<devices>` get exactly the `<channel>` elements `GuestLayout.libvirt_xml()`
prints, nothing edited. libvirt runs QEMU as its own user, so the files it must open
(kernel, per-run initrd, console log) are placed in a directory that user can read.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from vmtrace.errors import VmtraceError


def domain_xml(name: str, kernel: Path, initrd: Path, cmdline: str, channels_xml: str,
               console_log: Path, cpus: int = 2, memory_mb: int = 512) -> str:
    """The whole domain; `channels_xml` is inserted verbatim into `<devices>`."""
    channels = "\n".join("    " + l for l in channels_xml.strip().splitlines())
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{int(memory_mb)}</memory>
  <vcpu>{int(cpus)}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <controller type='virtio-serial' index='0'/>
{channels}
    <memballoon model='none'/>
  </devices>
</domain>
"""


def validate(xml_path: Path) -> None:
    """Check a domain file against libvirt's own schema (`virt-xml-validate`)."""
    tool = shutil.which("virt-xml-validate")
    if tool is None:
        raise VmtraceError("virt-xml-validate not found: apt-get install libvirt-clients")
    res = subprocess.run([tool, str(xml_path), "domain"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise VmtraceError(f"{xml_path} is not a valid libvirt domain: {msg[0] if msg else '?'}")
