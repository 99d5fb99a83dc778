"""Build hook for the one compiled module; everything else is configured in pyproject.toml.

`projections._speedups` is optional: without a C compiler the build skips it and the
projector runs its Python path alone (same results, slower; see projections/fastpath.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "projections._speedups",
            sources=["projections/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
