"""The vmtrace guest agent: splices ftrace's per-CPU ring-buffer pages to the host.

Standard library only, Python 3.9+, so it runs in any guest with a Python; it also
ships as one self-contained zipapp (``vmtrace agent --export PATH``). Nothing here
imports numpy, click or the host side.
"""
VERSION = "0.1.0"
