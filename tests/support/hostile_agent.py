"""A fake guest agent that speaks vmtrace's real protocol, well-behaved or hostile.

It uses the protocol's own encoder (``vmtrace.protocol``) over a guest directory made
by ``vmtrace prepare`` (real FIFOs, or real unix sockets), so what the recorder meets
is exactly what a guest could send through QEMU. Run as its own process beside
``vmtrace record``::

    python tests/support/hostile_agent.py --ports DIR --data RAWDIR --mode MODE

RAWDIR is a raw directory (``metadata/...`` and ``cpuN``): the metadata it sends and
the ring-buffer pages it replays on its data ports after ``start``. ``--mode good`` is
a well-behaved agent; every other mode answers the protocol correctly *except* for one
attack (see MODES), so that the recording reaches the attack. Standard library and
vmtrace.protocol only, like the real agent.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
import zlib
from typing import Any, Callable, Dict, List, Optional

from vmtrace import protocol as P

PAGE = 4096
BIG = 1 << 64            # one past the largest u64
HUGE = 10 ** 4000        # parses in Python, breaks everything downstream
MIB = 1 << 20


def _values() -> Dict[str, Any]:
    """Named absurd values a mode can put into a field: ``hello:cpus=@big``."""
    return {"@big": BIG, "@huge": HUGE, "@neg": -1, "@nan": float("nan"), "@inf": float("inf"),
            "@true": True, "@float": 1.5, "@str": "12", "@nanstr": "NaN", "@null": None,
            "@list": [1, 2], "@obj": {"a": 1}, "@u32": 1 << 32, "@long": "x" * 100_000,
            "@bigcpus": [BIG], "@boolcpus": [True, False], "@dupcpus": [0, 0], "@manycpus": list(range(5000)),
            "@ctl": "evil\nhost\x1b[31m\x00", "@longlist": ["sched:sched_switch"] * 40_000}


def _value(text: str) -> Any:
    vals = _values()
    return vals[text] if text in vals else json.loads(text)


def _encode_raw(mtype: int, fields: Dict[str, Any], blob: bytes = b"") -> bytes:
    """P.encode without its checks, so that out-of-range values can be sent as JSON."""
    body = json.dumps(fields, separators=(",", ":")).encode()
    return P.HEADER.pack(P.MAGIC, P.VERSION, mtype, 0, len(body), len(blob)) + body + blob


class Agent:
    def __init__(self, ports: str, data: str, mode: str, transport: str):
        self.dir = ports
        self.mode, _, self.variant = mode.partition(":")
        self.transport = transport
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.running = False
        self.files = self._load_metadata(os.path.join(data, "metadata"))
        self.ncpus = len([n for n in os.listdir(ports) if n.startswith("trace-path-cpu")]) // (
            2 if transport == "fifo" else 1)
        self.pages = {}
        for c in range(self.ncpus):
            path = os.path.join(data, "cpu%d" % c)
            self.pages[c] = open(path, "rb").read() if os.path.exists(path) else b""
        self.sent = {c: 0 for c in range(self.ncpus)}
        self.pumped = threading.Event()

    # -- ports ---------------------------------------------------------------------------
    def _connect(self, name: str) -> int:
        path = os.path.join(self.dir, name)
        deadline = time.monotonic() + 60
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s.detach()
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def open(self) -> None:
        if self.transport == "fifo":
            self.rfd = os.open(os.path.join(self.dir, "agent-ctl-path.in"), os.O_RDONLY)
            self.wfd = os.open(os.path.join(self.dir, "agent-ctl-path.out"), os.O_WRONLY)
            self.data = [os.open(os.path.join(self.dir, "trace-path-cpu%d.out" % c), os.O_WRONLY)
                         for c in range(self.ncpus)]
        else:
            self.rfd = self.wfd = self._connect("agent-ctl-path")
            self.data = [self._connect("trace-path-cpu%d" % c) for c in range(self.ncpus)]

    def close(self) -> None:
        for fd in {self.rfd, self.wfd, *self.data}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.done.set()

    def write(self, data: bytes) -> bool:
        """Write whole frames (a lock keeps a flood thread's frames from interleaving)."""
        with self.lock:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.wfd, view):]
                except OSError:
                    self.done.set()
                    return False
        return True

    # -- what a good agent says ----------------------------------------------------------
    @staticmethod
    def _load_metadata(root: str) -> Dict[str, bytes]:
        out = {}
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                path = os.path.join(dirpath, n)
                rel = os.path.relpath(path, root)
                if rel != "meta.json":
                    out[rel] = open(path, "rb").read()
        return out

    def meta(self) -> Dict[str, Any]:
        return {"layout": "vmtrace-raw", "layout_version": 1, "kernel": "6.1.0-fake", "hostname": "fakeguest",
                "machine": "x86_64", "cpus": list(range(self.ncpus)), "offline_cpus": [],
                "nr_cpus": self.ncpus, "page_size": PAGE, "long_size": 8, "endian": "little", "clock": "local",
                "agent": {"version": "0.1.0"}, "stats": {}, "options": {}}

    def hello(self) -> Dict[str, Any]:
        return {"protocol": 1, "agent_version": "0.1.0", "kernel": "6.1.0-fake", "hostname": "fakeguest",
                "machine": "x86_64", "cpus": list(range(self.ncpus)), "offline": [], "nr_cpus": self.ncpus,
                "page_size": PAGE, "long_size": 8, "endian": "little", "clocks": ["local", "mono"],
                "clock": "local", "instance": None, "buffer_size_kb": 1024, "buffer_percent": 50,
                "events": [], "running": self.running, "python": "3.9.0"}

    def cpu_stats(self) -> Dict[str, Any]:
        return {str(c): {"entries": 0, "overrun": 0, "dropped_events": 0, "read_events": 0,
                         "bytes_sent": self.sent[c], "pages_sent": self.sent[c] // PAGE, "partial_pages": 0,
                         "pages_dropped": 0, "lost_events": 0, "error": None} for c in range(self.ncpus)}

    def metadata_frame(self, rid: Any, kallsyms: bool) -> bytes:
        files = dict(self.files)
        files["meta.json"] = json.dumps(self.meta()).encode()
        if self.mode == "meta":
            key, _, val = self.variant.partition("=")
            meta = self.meta()
            meta[key] = _value(val)
            files["meta.json"] = json.dumps(meta).encode()
        elif self.mode == "kallsyms-bomb":
            files["kallsyms.gz"] = gzip_bomb(256 * MIB)
        elif self.mode == "meta-oversize":   # 9 MiB, or meta-oversize:MIB
            files["saved_cmdlines"] = b"1 x\n" * (int(self.variant or 9) * MIB // 4)
        elif self.mode == "meta-files":
            files.update({"events/bomb/e%d/format" % i: b"x" for i in range(9000)})
        elif self.mode == "meta-badname":
            index = [["../../etc/passwd", 1]]
            return _encode_raw(P.METADATA, {"id": rid, "files": index}, b"x")
        msg = P.pack_files(files, id=rid)
        return P.encode(msg)

    def pump(self) -> None:
        """The pages, once, as a guest's pumps would after start."""
        for c, fd in enumerate(self.data):
            data = self.pages.get(c, b"")
            for i in range(0, len(data), PAGE):
                try:
                    os.write(fd, data[i:i + PAGE])
                except OSError:
                    return
                self.sent[c] += PAGE
        self.pumped.set()

    # -- the conversation -------------------------------------------------------------------
    def reply(self, msg: P.Message) -> Optional[bytes]:
        rid = msg.get("id")
        mode, var = self.mode, self.variant
        if msg.name == "hello":
            fields = dict(self.hello(), id=rid)
            if mode == "hello":
                key, _, val = var.partition("=")
                fields[key] = _value(val)
            return _encode_raw(P.HELLO, fields)
        if msg.name == "configure":
            if mode == "configure-error":
                return _encode_raw(P.ERROR, {"id": rid, "re": "configure", "message": "no\nsuch\x1b[2J" + "x" * 50000})
            return P.encode(P.msg("ok", id=rid, re="configure"))
        if msg.name == "metadata":
            return self.metadata_frame(rid, bool(msg.get("kallsyms")))
        if msg.name == "start":
            self.running = True
            threading.Thread(target=self.pump, daemon=True).start()
            attack = ATTACKS.get(mode)
            if attack is not None:
                threading.Thread(target=attack, args=(self,), daemon=True).start()
            return P.encode(P.msg("ok", id=rid, re="start"))
        if msg.name == "time_probe":
            fields = {"id": rid, "seq": msg.get("seq"), "clock": "local", "guest_ns": time.monotonic_ns(),
                      "source": "CLOCK_MONOTONIC", "approximate": True, "marker": False}
            if mode == "probe":
                key, _, val = var.partition("=")
                fields[key] = _value(val) if key != "seq" else (msg.get("seq") or 0) + 1
            return _encode_raw(P.TIME_PROBE, fields)
        if msg.name == "stats":
            fields = {"id": rid, "cpus": self.cpu_stats(), "agent": {"cpu_time_s": 0.01, "pump_cpus": [0]},
                      "running": self.running}
            if mode == "stats":
                fields["cpus"] = _value(var) if var.startswith("@") else json.loads(var)
            return _encode_raw(P.STATS, fields)
        if msg.name == "stop":
            if mode in ("slow-loris", "mid-frame-disconnect"):
                self.close()
                return None
            self.pumped.wait(10)
            self.running = False
            stats: Any = self.cpu_stats()
            if mode == "stop":
                stats = _value(var) if var.startswith("@") else json.loads(var)
            return _encode_raw(P.OK, {"id": rid, "re": "stop", "stats": stats})
        if msg.name == "bye":
            self.write(P.encode(P.msg("bye", id=rid, stats=self.cpu_stats())))
            self.close()
            return None
        return P.encode(P.msg("error", id=rid, re=msg.name, message="not taken"))

    def run(self) -> None:
        self.open()
        dec = P.Decoder(allow_orders=True)
        while not self.done.is_set():
            try:
                data = os.read(self.rfd, 65536)
            except OSError:
                break
            if not data:
                break
            for item in dec.feed(data):
                if isinstance(item, P.Message):
                    out = self.reply(item)
                    if out is not None and not self.write(out):
                        break
        self.close()


def gzip_bomb(expanded: int) -> bytes:
    """A valid gzip stream of ``expanded`` zero bytes, built without holding them."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MIB)
    parts = [z.compress(chunk) for _ in range(expanded // MIB)]
    parts.append(z.flush())
    return b"".join(parts)


# -- attacks that run beside the conversation, from the start order on ---------------------

def _fresh_ids() -> Callable[[], int]:
    n = [10 ** 9]

    def nxt() -> int:
        n[0] += 1
        return n[0]
    return nxt


def flood_json(a: Agent) -> None:
    """Unsolicited 1 MiB JSON frames with fresh ids, as fast as the port takes them, or
    at ``flood-json:MB`` megabytes per second."""
    ids = _fresh_ids()
    pad = "x" * (MIB - 100)
    rate = float(a.variant) * 1e6 if a.variant else 0.0
    t0 = time.monotonic()
    sent = 0
    while not a.done.is_set() and a.write(P.encode(P.msg("ok", id=ids(), pad=pad))):
        sent += MIB
        if rate:
            time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))


def flood_ints(a: Agent) -> None:
    """Unsolicited replies whose JSON is the costliest to check: 500 KiB of small
    integers plus one that needs the exact (slow) range check; ``flood-ints:MB`` for a
    rate in megabytes per second."""
    rate = float(a.variant) * 1e6 if a.variant else 0.0
    frame = _encode_raw(P.OK, {"id": 10 ** 9, "big": 10 ** 18, "pad": [0] * 250_000})
    t0 = time.monotonic()
    sent = 0
    while not a.done.is_set() and a.write(frame):
        sent += len(frame)
        if rate:
            time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))


def flood_blobs(a: Agent) -> None:
    """20 unsolicited ``ok`` replies, each with a 64 MiB blob and a fresh id."""
    ids = _fresh_ids()
    chunk = bytes(MIB)
    for _ in range(20):
        head = P.header(P.OK, {"id": ids(), "re": "stats"}, 64 * MIB)
        with a.lock:
            try:
                os.write(a.wfd, head)
                for _ in range(64):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(a.wfd, view):]
            except OSError:
                a.done.set()
                return


def flood_small(a: Agent) -> None:
    """Tiny unsolicited replies with fresh ids (the recorder once kept 1024 of them)."""
    ids = _fresh_ids()
    while not a.done.is_set() and a.write(b"".join(P.encode(P.msg("ok", id=ids())) for _ in range(256))):
        pass


def flood_garbage(a: Agent) -> None:
    rnd = random.Random(1)
    block = bytes(rnd.getrandbits(8) for _ in range(65536))
    while not a.done.is_set() and a.write(block):
        pass


def flood_bad_headers(a: Agent) -> None:
    """The magic followed by junk, over and over: each looks like a frame for 4 bytes."""
    block = (P.MAGIC + b"x" * 12) * 4096
    while not a.done.is_set() and a.write(block):
        pass


def flood_oversized(a: Agent) -> None:
    """Headers that declare the largest lengths the format can carry."""
    block = P.HEADER.pack(P.MAGIC, P.VERSION, P.OK, 0, 0xFFFFFFFF, 0xFFFFFFFF) * 4096
    while not a.done.is_set() and a.write(block):
        pass


def slow_loris(a: Agent) -> None:
    """A frame that never completes, one byte every 100 ms."""
    frame = P.encode(P.msg("ok", id=10 ** 9, pad="y" * (MIB - 100)))
    for b in frame:
        if a.done.is_set() or not a.write(bytes([b])):
            return
        time.sleep(0.1)


def mid_frame_disconnect(a: Agent) -> None:
    """Half a frame, then the agent is gone (control and data ports closed)."""
    time.sleep(0.3)
    frame = P.encode(P.msg("stats", id=10 ** 9, cpus={}))
    a.write(frame[: len(frame) // 2])
    a.pumped.wait(5)
    a.close()


ATTACKS: Dict[str, Callable[[Agent], None]] = {
    "flood-json": flood_json,
    "flood-ints": flood_ints,
    "flood-blobs": flood_blobs,
    "flood-small": flood_small,
    "flood-garbage": flood_garbage,
    "flood-bad-headers": flood_bad_headers,
    "flood-oversized": flood_oversized,
    "slow-loris": slow_loris,
    "mid-frame-disconnect": mid_frame_disconnect,
}
# Modes with a variant after ':' (hello:FIELD=VALUE, meta:FIELD=VALUE, probe:FIELD=VALUE,
# stats:JSON, stop:JSON) change one field of one reply; VALUE is JSON or one of the
# named values in _values().
MODES: List[str] = ["good", "configure-error", "kallsyms-bomb", "meta-oversize", "meta-files",
                    "meta-badname", *ATTACKS, "hello", "meta", "probe", "stats", "stop"]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ports", required=True, help="the guest directory made by vmtrace prepare")
    ap.add_argument("--data", required=True, help="a raw directory: metadata/ and cpuN page files")
    ap.add_argument("--mode", default="good")
    ap.add_argument("--transport", choices=("fifo", "socket"), default="fifo")
    args = ap.parse_args(argv)
    if args.mode.partition(":")[0] not in MODES:
        ap.error("unknown mode %r" % args.mode)
    Agent(args.ports, args.data, args.mode, args.transport).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
