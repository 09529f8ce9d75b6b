"""Build configuration beyond pyproject.toml: the optional C page walker.

``optional=True``: if the C compiler or Python headers are missing, the build warns and
goes on, and vmtrace uses its numpy walk (``vmtrace.format.ringbuffer.walker()``).
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("vmtrace.format._walk", ["src/vmtrace/format/_walk.c"],
              extra_compile_args=["-O2"], optional=True),
])
