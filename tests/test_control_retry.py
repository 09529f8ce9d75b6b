"""The host resends idempotent requests (configure, metadata) when a frame is lost, as
happened while a virtio-serial port's socket chardev reconnected (test_e2e_restart)."""
from __future__ import annotations

import os
import threading

from vmtrace import protocol
from vmtrace.host.control import AgentLink


def _agent(rfd: int, wfd: int, drop_first: int, seen: list) -> None:
    """A minimal agent over real pipes: ignores the first ``drop_first`` requests."""
    dec = protocol.Decoder(allow_orders=False)
    while True:
        data = os.read(rfd, 65536)
        if not data:
            return
        for item in dec.feed(data):
            if not isinstance(item, protocol.Message):
                continue
            seen.append(item.get("id"))
            if len(seen) <= drop_first:
                continue
            os.write(wfd, protocol.encode(protocol.msg("ok", id=item.get("id"), re=item.name)))


def _link(drop_first: int):
    h2a_r, h2a_w = os.pipe()
    a2h_r, a2h_w = os.pipe()
    os.set_blocking(a2h_r, False)  # the recorder opens its ends non-blocking
    seen: list = []
    t = threading.Thread(target=_agent, args=(h2a_r, a2h_w, drop_first, seen), daemon=True)
    t.start()
    return AgentLink("g", a2h_r, h2a_w, "fifo"), seen, (h2a_w,)


def test_lost_request_is_resent_and_answered():
    link, seen, _ = _link(drop_first=1)
    rep = link.call_idempotent("configure", timeout=5.0, every=0.2, events=["sched"])
    assert rep is not None and rep.name == "ok" and rep.get("re") == "configure"
    assert len(seen) == 2 and seen[0] != seen[1]
    # a plain call in the same situation gets no answer
    link2, _, _ = _link(drop_first=1)
    assert link2.call("configure", 0.5, events=["sched"]) is None


def test_gives_up_at_the_timeout():
    link, seen, _ = _link(drop_first=10**6)
    assert link.call_idempotent("metadata", timeout=0.7, every=0.2) is None
    assert 3 <= len(seen) <= 5


def _trickling_agent(rfd: int, wfd: int, seen: list, chunks: int, pause: float) -> None:
    """Answers every request with one large reply written in slow pieces, as a starved
    guest pushes a metadata reply through its port."""
    import time

    dec = protocol.Decoder(allow_orders=False)
    while True:
        data = os.read(rfd, 65536)
        if not data:
            return
        for item in dec.feed(data):
            if not isinstance(item, protocol.Message):
                continue
            seen.append(item.get("id"))
            frame = protocol.encode(protocol.msg("ok", id=item.get("id"), pad="x" * 4000))
            step = len(frame) // chunks + 1
            for i in range(0, len(frame), step):
                os.write(wfd, frame[i:i + step])
                time.sleep(pause)


def test_no_resend_while_a_reply_is_arriving():
    h2a_r, h2a_w = os.pipe()
    a2h_r, a2h_w = os.pipe()
    os.set_blocking(a2h_r, False)
    seen: list = []
    # 10 pieces 0.1 s apart: a reply that takes 1 s, five times the resend period
    threading.Thread(target=_trickling_agent, args=(h2a_r, a2h_w, seen, 10, 0.1), daemon=True).start()
    link = AgentLink("g", a2h_r, h2a_w, "fifo")
    rep = link.call_idempotent("metadata", timeout=5.0, every=0.2)
    assert rep is not None and rep.name == "ok" and len(rep.get("pad")) == 4000
    import time

    time.sleep(0.3)  # let the agent read any resent copies
    assert len(seen) == 1, "resent %d times while the reply was still arriving" % (len(seen) - 1)
