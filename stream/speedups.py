"""Whether this process uses the optional compiled helpers.

setup.py builds `stream._tuples` and `projections._speedups` when a C compiler is there;
each stands in for a Python function that stays the definition (unit tests hold them to
it). `MISSION_RUNNER_PURE_PYTHON=1` makes the process use the Python functions alone: same
results, lower throughput (for comparing, or to rule the compiled code out).
"""

from __future__ import annotations

import os


def pure_python() -> bool:
    """`MISSION_RUNNER_PURE_PYTHON` is true (`1`, `true`, `yes`, `on`); the service's settings
    reject a value that is not a boolean at start."""
    value = os.environ.get("MISSION_RUNNER_PURE_PYTHON", "").strip().lower()
    return value in ("1", "true", "yes", "on")
