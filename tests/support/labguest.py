"""Shared helpers for the tests that boot the lab guest (test_lab*.py, test_e2e*.py).

The image is built (or found in the cache) once per test session; every VM test boots
it under TCG, because nested KVM hangs on the machines this runs on and the issue asks
for the end-to-end test under TCG.
"""
from __future__ import annotations

import functools
import shutil

import pytest


@functools.lru_cache(maxsize=1)
def _image():
    from vmtrace.lab.image import build_image
    return build_image()


def lab_image():
    """The built image; a skip only when QEMU itself is absent (make test installs it)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86 (make test installs it)")
    return _image()
