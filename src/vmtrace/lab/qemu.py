"""Boot the lab image in QEMU, run one script in it, and always leave nothing running.

The guest's serial console is QEMU's stdout; a reader thread keeps every line and
watches for the init script's READY and EXIT markers, which carry a per-boot nonce so
that a workload printing the same words cannot confuse us. QEMU is started with
PR_SET_PDEATHSIG, so it dies with us even if we are killed without cleaning up, and
`Guest.close()` terminates then kills it on every other path.

KVM is used when it works: on this kind of machine `/dev/kvm` opens but nested guests
hang after the kernel decompresses, so a short probe boot decides, and its answer is
remembered per host boot (keyed by /proc/sys/kernel/random/boot_id).
"""
from __future__ import annotations

import ctypes
import gzip
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from vmtrace.errors import VmtraceError
from vmtrace.lab import cpio
from vmtrace.lab.image import LabImage, cache_root, touch_used

QEMU = "qemu-system-x86_64"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


@dataclass
class GuestResult:
    """What a finished boot tells us."""
    exit_code: Optional[int]          # the script's status; None if it never finished
    qemu_returncode: Optional[int]
    console: list[str]
    ready: dict
    accel: str
    seconds: float
    stderr: str = ""

    @property
    def output(self) -> str:
        """The console lines the script printed (between READY and EXIT)."""
        return "\n".join(self.script_lines)

    script_lines: list[str] = field(default_factory=list)


def count_serial_ports(args: Iterable[str]) -> int:
    """How many virtserialports the command line wires; init waits for them all."""
    return sum(1 for a in args if re.match(r"\s*virtserialport\b", a))


def overlay_archive(script: str, files: Optional[dict[str, bytes]] = None) -> bytes:
    """A gzip'd cpio with /lab/run.sh and extra files, appended after the cached image."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz:
        w = cpio.CpioWriter(gz)
        w.add_bytes("lab/run.sh", script.encode(), 0o755)
        for path, data in (files or {}).items():
            w.add_bytes(path, data, 0o755)
        w.close()
    return buf.getvalue()


def make_initrd(image: LabImage, dest: Path, script: str,
                files: Optional[dict[str, bytes]] = None) -> Path:
    """The cached image with this run's script appended (the kernel unpacks both)."""
    touch_used(image.initrd.parent)
    try:
        base = open(image.initrd, "rb")
    except FileNotFoundError:
        raise VmtraceError(f"the guest image {image.initrd.parent} is gone from the cache "
                           "(removed by hand?); build_image() makes it again") from None
    with base, open(dest, "wb") as out:
        shutil.copyfileobj(base, out, 1 << 20)
        pad = (-out.tell()) % 4
        out.write(b"\0" * pad + overlay_archive(script, files))
    return dest


def kernel_cmdline(nonce: str, ports: int, append: str = "") -> str:
    """Quiet serial console, QEMU exits on panic, and what our /init reads.

    ``VMTRACE_GUEST_LOGLEVEL`` (default 3: errors only) lets the tests ask for warnings
    too, so that a kernel BUG in a CI guest comes with its stack trace.
    """
    level = os.environ.get("VMTRACE_GUEST_LOGLEVEL", "3")
    if not (level.isdigit() and int(level) <= 8):
        raise VmtraceError("VMTRACE_GUEST_LOGLEVEL must be 0..8, not %r" % level)
    return (f"console=ttyS0 quiet loglevel={level} panic=-1 vmtrace.nonce={nonce} "
            f"vmtrace.ports={ports} {append}").strip()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def resolve_accel(image: LabImage, accel: str = "auto", probe_timeout: float = 10.0) -> str:
    """'kvm' or 'tcg': what was asked for, or for 'auto' what a probe boot shows works."""
    accel = os.environ.get("VMTRACE_ACCEL", accel) if accel == "auto" else accel
    if accel in ("tcg", "kvm"):
        return accel
    if accel != "auto":
        raise VmtraceError(f"unknown accelerator {accel!r} (use auto, kvm or tcg)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    memo = cache_root() / "kvm-probe.json"
    key = f"{_boot_id()}:{image.kernel}"
    try:
        saved = json.loads(memo.read_text())
        if saved.get("key") == key:
            return saved["accel"]
    except (OSError, ValueError):
        pass
    ok = probe_kvm(image, timeout=probe_timeout)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}")     # readers never see half a file
    tmp.write_text(json.dumps({"key": key, "accel": "kvm" if ok else "tcg"}))
    os.replace(tmp, memo)
    return "kvm" if ok else "tcg"


def probe_kvm(image: LabImage, timeout: float = 10.0) -> bool:
    """Does a KVM guest reach our init within `timeout`? (A nested one here hangs.)"""
    try:
        with Guest(image, script="", accel="kvm") as g:
            g.wait_ready(timeout)
            return True
    except VmtraceError:
        return False


class Guest:
    """One boot of the lab image. Use as a context manager; see module docstring."""

    def __init__(self, image: LabImage, *, script: str = "", files: Optional[dict[str, bytes]] = None,
                 qemu_args: Iterable[str] = (), smp: int = 2, memory_mb: int = 512,
                 accel: str = "tcg", workdir: Optional[Path] = None,
                 console_log: Optional[Path] = None,
                 on_line: Optional[Callable[[str], None]] = None,
                 append: str = "", files_port: bool = False, tcg_thread: str = "single") -> None:
        if shutil.which(QEMU) is None:
            raise VmtraceError(f"{QEMU} not found: apt-get install qemu-system-x86 (make deps does it)")
        self.image = image
        self.accel = accel if accel in ("kvm", "tcg") else resolve_accel(image, accel)
        self.smp = smp
        self.nonce = secrets.token_hex(6)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vmtrace-lab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console: list[str] = []
        self.ready: dict = {}
        self.exit_code: Optional[int] = None
        self._ready_ev = threading.Event()
        self._exit_ev = threading.Event()
        self._on_line = on_line
        self._log = open(console_log, "w") if console_log else None
        self._proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None
        self._stderr = b""
        self._t0 = 0.0
        self._ready_index = 0
        self.qemu_args = list(qemu_args)
        self.files_out: Optional[Path] = None
        if files_port:
            # A port of our own, on its own controller so its numbering cannot collide
            # with the wiring we were given; QEMU writes what the guest sends to a file.
            self.files_out = self.workdir / "lab-files.tar"
            self.qemu_args += ["-device", "virtio-serial-pci,id=vmtlab",
                               "-chardev", f"file,id=vmtlabf,path={self.files_out}",
                               "-device", "virtserialport,bus=vmtlab.0,nr=1,chardev=vmtlabf,"
                               "name=vmtrace-lab-files"]
        initrd = make_initrd(image, self.workdir / "initrd.img", script, files)
        cmdline = kernel_cmdline(self.nonce, count_serial_ports(self.qemu_args), append)
        # TCG runs every vCPU in one host thread by default. With one thread per vCPU
        # (thread=multi, QEMU 7.2), a guest on a loaded host wedged for good while
        # enabling tracepoints: text_poke_bp's IPI to the other vCPU was never handled
        # (soft lockup in smp_call_function_many_cond, 26 s in CI, 105 s here). One thread
        # makes the vCPUs take turns: slower, but it never wedged. `vmtrace bench
        # --guest` asks for multi, since its figures need vCPUs that really run side by
        # side; VMTRACE_TCG_THREAD overrides both (the tests set single).
        thread = os.environ.get("VMTRACE_TCG_THREAD", tcg_thread)
        if thread not in ("single", "multi"):
            raise VmtraceError("VMTRACE_TCG_THREAD must be single or multi, not %r" % thread)
        self.tcg_thread = thread
        accel_args = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-accel", "tcg,thread=%s" % thread]
        self.argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none",
                     "-serial", "stdio", "-no-reboot", *accel_args,
                     "-smp", str(smp), "-m", str(memory_mb),
                     "-kernel", str(image.kernel), "-initrd", str(initrd),
                     "-append", cmdline, *self.qemu_args]

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "Guest":
        self._t0 = time.monotonic()
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          preexec_fn=_die_with_parent)
        except OSError as exc:
            raise VmtraceError(f"cannot start {QEMU}: {exc}") from exc
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        return self

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.show_console_under_pytest()
        self.close()

    def show_console_under_pytest(self, lines: int = 80) -> None:
        """Under pytest, a failing VM test shows what the guest said (the agent's messages,
        a kernel BUG): in CI that is the only trace left of the failure."""
        if "PYTEST_CURRENT_TEST" in os.environ:
            tail = self.console[-lines:]
            sys.stderr.write("--- guest console, last %d lines ---\n%s\n" % (len(tail), "\n".join(tail)))

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def _read_console(self) -> None:
        assert self._proc and self._proc.stdout
        ready_tag = f"VMTRACE-LAB-{self.nonce} READY"
        exit_tag = f"VMTRACE-LAB-{self.nonce} EXIT"
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            self.console.append(line)
            if self._log:
                self._log.write(line + "\n")
                self._log.flush()
            if line.startswith(ready_tag):
                self.ready = dict(kv.split("=", 1) for kv in line[len(ready_tag):].split() if "=" in kv)
                self._ready_index = len(self.console)
                self._ready_ev.set()
                continue
            if line.startswith(exit_tag):
                try:
                    self.exit_code = int(line[len(exit_tag):].strip())
                except ValueError:
                    self.exit_code = -1
                self._exit_ev.set()
                continue
            if self._on_line and self._ready_ev.is_set() and not self._exit_ev.is_set():
                try:
                    self._on_line(line)
                except Exception:
                    pass
        self._ready_ev.set()
        self._exit_ev.set()

    def _read_stderr(self) -> None:
        assert self._proc and self._proc.stderr
        self._stderr = self._proc.stderr.read()

    def _why_not(self) -> str:
        err = self._stderr.decode("utf-8", "replace").strip().splitlines()
        tail = err[-1] if err else (self.console[-1] if self.console else "no console output")
        return tail

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Block until init is about to run the script; returns cpus, ports, kernel."""
        if not self._ready_ev.wait(timeout):
            self.kill()
            raise VmtraceError(f"the guest did not boot within {timeout:.0f} s ({self.accel}): "
                               f"{self._why_not()}")
        if not self.ready:
            self.kill()
            raise VmtraceError(f"the guest stopped before it was ready: {self._why_not()}")
        return self.ready

    def wait_exit(self, timeout: float = 120.0) -> Optional[int]:
        """Block until the script has finished and QEMU has exited; the script's status."""
        deadline = time.monotonic() + timeout
        if not self._exit_ev.wait(max(0.0, deadline - time.monotonic())):
            self.kill()
            raise VmtraceError(f"the guest's command did not finish within {timeout:.0f} s")
        if self._proc:
            try:
                self._proc.wait(max(1.0, min(15.0, deadline - time.monotonic() + 10)))
            except subprocess.TimeoutExpired:
                self.kill()
        if self._reader:
            self._reader.join(5)
        return self.exit_code

    def script_lines(self) -> list[str]:
        tag = f"VMTRACE-LAB-{self.nonce} EXIT"
        out = []
        for line in self.console[self._ready_index:]:
            if line.startswith(tag):
                break
            out.append(line)
        return out

    def result(self) -> GuestResult:
        return GuestResult(self.exit_code, self._proc.returncode if self._proc else None,
                           list(self.console), dict(self.ready), self.accel,
                           round(time.monotonic() - self._t0, 2),
                           self._stderr.decode("utf-8", "replace"), self.script_lines())

    def received_files(self, dest: Path) -> Path:
        """Unpack what the guest sent with `lab_send` (files_port=True) into `dest`."""
        import tarfile
        if self.files_out is None or not self.files_out.is_file() or not self.files_out.stat().st_size:
            raise VmtraceError("the guest sent no files over the lab port")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(self.files_out) as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise VmtraceError(f"the files the guest sent are damaged: {exc}") from exc
        return dest

    def kill(self) -> None:
        """Power off the hard way: SIGTERM, then SIGKILL if QEMU does not go."""
        p = self._proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def close(self) -> None:
        self.kill()
        if self._reader:
            self._reader.join(5)
        for stream in (self._proc.stdout, self._proc.stderr) if self._proc else ():
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass
        if self._log:
            self._log.close()
            self._log = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run(image: LabImage, script: str, *, timeout: float = 180.0, **kwargs) -> GuestResult:
    """Boot, run `script` in the guest, wait for power-off, and return what happened."""
    with Guest(image, script=script, **kwargs) as g:
        g.wait_ready(min(timeout, 90.0))
        g.wait_exit(timeout)
        return g.result()


def quote(cmd: str | list[str]) -> str:
    return cmd if isinstance(cmd, str) else " ".join(shlex.quote(c) for c in cmd)
