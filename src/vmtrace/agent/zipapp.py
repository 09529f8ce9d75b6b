"""Write the agent as one self-contained zipapp that runs with ``python3 FILE``.

A guest has a Python but not vmtrace; copying one file in is all it takes. The archive
holds only the standard-library-only modules the agent imports (never numpy or click),
read from this installation so the guest runs exactly this version.
"""
from __future__ import annotations

import os
import stat
import zipfile

# The agent's closure: everything it imports from vmtrace.
MODULES = ("__init__.py", "errors.py", "tracefs.py", "protocol.py")
ENTRY = (
    "import sys\n"
    "from vmtrace.agent.__main__ import main\n"
    "sys.exit(main())\n"
)


def export(path: str) -> str:
    # this installation's vmtrace package: the directory above agent/
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    agent_dir = os.path.join(pkg, "agent")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("__main__.py", ENTRY)
            for name in MODULES:
                z.write(os.path.join(pkg, name), "vmtrace/" + name)
            for name in sorted(os.listdir(agent_dir)):
                if name.endswith(".py"):
                    z.write(os.path.join(agent_dir, name), "vmtrace/agent/" + name)
    os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, path)
    return path
