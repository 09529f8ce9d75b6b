"""The old home of ``record``, kept because callers outside host/ import it from here."""
from vmtrace.host.recording import record

__all__ = ["record"]
