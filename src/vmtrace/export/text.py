"""Text exactly as ``trace-cmd report`` prints it (a session: every source's lines on
the host's clock, tagged with the source); the default format of ``vmtrace report``."""
from __future__ import annotations

import sys
from typing import Any, Optional

from vmtrace.export import Export

FORMAT = Export("text", "identical to `trace-cmd report` (a session: each line tagged with its source)")


def write(source: Any, out: Optional[str], selection: Any) -> Optional[str]:
    """Write the text to ``out`` or standard output, in large blocks."""
    blocks = source.text_blocks(**selection.kwargs())
    if out:
        with open(out, "wb") as f:
            for block in blocks:
                f.write(block)
        return None
    sys.stdout.flush()
    raw = getattr(sys.stdout, "buffer", None)
    if raw is None:          # a text-only stdout (tests capturing output)
        for block in blocks:
            sys.stdout.write(block.decode("utf-8", "surrogateescape"))
        sys.stdout.flush()
        return None
    for block in blocks:
        raw.write(block)
    raw.flush()
    return None
