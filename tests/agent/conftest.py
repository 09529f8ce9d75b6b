"""The agent's tests record from a private tracefs instance of this machine."""
import itertools
import os

import pytest

from vmtrace.tracefs import Tracefs

_n = itertools.count()


@pytest.fixture
def inst():
    tf = Tracefs.create_instance("vmtrace-agent-test-%d-%d" % (os.getpid(), next(_n)))
    try:
        tf.tracing_on = False
        tf.buffer_size_kb = 4096  # per CPU, as in the loss measurement
        tf.enable_events(["sched:sched_switch"])
        tf.clear()
        tf.tracing_on = True
        yield tf
    finally:
        tf.tracing_on = False
        tf.remove()
