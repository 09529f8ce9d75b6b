"""Benchmarks that put vmtrace beside the tools a user already has.

Every figure is a ratio measured on one machine in one run (vmtrace against a reference
peer, alternated within each repetition), because absolute numbers from a shared,
virtualised 2-core machine say little on their own. ``overhead`` repeats the 2012
virtio-trace evaluation; ``decode`` and ``drain`` compare our decoder and host drain
loop with ``trace-cmd report`` and one ``cat`` per FIFO.
"""
