"""The lab: a real, small QEMU guest built from the host's Debian packages.

It exists so that the agent, the recorder and the demo are exercised against a real
kernel, real virtio-serial ports and a real ring buffer rather than a simulation.
`image` builds (and caches) the initramfs; `qemu` boots it and runs one command.
"""
