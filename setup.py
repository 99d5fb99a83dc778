"""Build hook for the compiled helpers; everything else is configured in pyproject.toml.

Both are optional: without a C compiler the build skips them and the service runs the
Python functions they stand in for (same results, slower; see stream/reader.py and
projections/fastpath.py).
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "stream._tuples",
            ["stream/_tuples.c"],
            optional=True,
            extra_compile_args=FLAGS,
        ),
        Extension(
            "projections._speedups",
            ["projections/_speedups.c"],
            optional=True,
            extra_compile_args=FLAGS,
        ),
    ]
)
