"""Build hook for the compiled helpers; everything else is configured in pyproject.toml.

Both are optional: without a C compiler the build skips them and the service runs the
Python functions they stand in for (same results, slower; see stream/speedups.py).
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

SHARED = {"include_dirs": ["stream"], "depends": ["stream/_slots.h"]}  # the shared header

setup(
    ext_modules=[
        Extension(
            "stream._tuples",
            ["stream/_tuples.c"],
            optional=True,
            extra_compile_args=FLAGS,
            **SHARED,
        ),
        Extension(
            "projections._speedups",
            ["projections/_speedups.c"],
            optional=True,
            extra_compile_args=FLAGS,
            **SHARED,
        ),
    ]
)
