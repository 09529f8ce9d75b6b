"""The host resends idempotent requests (hello, configure, metadata) that got no answer,
and never while an answer is still arriving.

Fakes stand in for the agent here, over real pipes, because what is tested is the host's
timing policy; the real agent answering real requests is in test_agent.py and the VM tests.
"""
from __future__ import annotations

import os
import threading
import time

from vmtrace import protocol
from vmtrace.host.control import AgentLink


def _agent(rfd: int, wfd: int, seen: list, drop_first: int = 0, pad: int = 0, chunks: int = 1,
           pause: float = 0.0) -> None:
    """A minimal agent: ignores the first ``drop_first`` requests and answers the others
    with ``ok`` (padded to ``pad`` bytes), written in ``chunks`` pieces ``pause`` s apart,
    as a starved guest pushes a large reply through its port."""
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
            frame = protocol.encode(protocol.msg("ok", id=item.get("id"), re=item.name, pad="x" * pad))
            step = len(frame) // chunks + 1
            for i in range(0, len(frame), step):
                os.write(wfd, frame[i:i + step])
                time.sleep(pause)


def _link(**agent):
    h2a_r, h2a_w = os.pipe()
    a2h_r, a2h_w = os.pipe()
    os.set_blocking(a2h_r, False)  # the recorder opens its ends non-blocking
    seen: list = []
    threading.Thread(target=_agent, args=(h2a_r, a2h_w, seen), kwargs=agent, daemon=True).start()
    return AgentLink("g", a2h_r, h2a_w, eof_before_writer=True), seen


def test_lost_request_is_resent_and_answered():
    link, seen = _link(drop_first=1)
    rep = link.call_idempotent("configure", timeout=5.0, every=0.2, events=["sched"])
    assert rep is not None and rep.name == "ok" and rep.get("re") == "configure"
    assert len(seen) == 2 and seen[0] != seen[1]
    # a plain call in the same situation gets no answer
    link2, _ = _link(drop_first=1)
    assert link2.call("configure", 0.5, events=["sched"]) is None


def test_gives_up_at_the_timeout():
    link, seen = _link(drop_first=10**6)
    assert link.call_idempotent("metadata", timeout=0.7, every=0.2) is None
    assert 3 <= len(seen) <= 5


def test_no_resend_while_a_reply_is_arriving():
    # 10 pieces 0.1 s apart: a reply that takes 1 s, five times the resend period
    link, seen = _link(pad=4000, chunks=10, pause=0.1)
    rep = link.call_idempotent("metadata", timeout=5.0, every=0.2)
    assert rep is not None and rep.name == "ok" and len(rep.get("pad")) == 4000
    time.sleep(0.3)  # let the agent read any resent copies
    assert len(seen) == 1, "resent %d times while the reply was still arriving" % (len(seen) - 1)
