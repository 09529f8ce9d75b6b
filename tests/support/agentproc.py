"""The agent as a user starts it (``python -m vmtrace.agent``), from this checkout."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from paths import ROOT


def agent(*args: str, python: str = sys.executable, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([python, "-m", "vmtrace.agent", *args], env=env,
                            stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=subprocess.PIPE, **kw)


def finish(p: subprocess.Popen, sig: Optional[int] = None, timeout: float = 30) -> str:
    if sig is not None:
        p.send_signal(sig)
    _, err = p.communicate(timeout=timeout)
    text = err.decode(errors="replace")
    assert p.returncode == 0, text
    assert "Traceback" not in text
    return text
