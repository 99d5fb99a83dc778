"""Named fail points for crash tests (`MISSION_RUNNER_FAILPOINTS`).

`MISSION_RUNNER_FAILPOINTS="after-persist=3"` makes the process SIGKILL itself the third
time it passes the `after-persist` point. Unset (production), `hit()` is a dict lookup.
The points mark the places where a crash must not lose or duplicate anything.
"""

from __future__ import annotations

import os
import signal

from core.errors import ConfigurationError

KNOWN = frozenset(
    {
        "after-persist",  # the batch and checkpoint committed, not yet confirmed
        "before-apply-large",  # a transaction of >= 1000 rows received, not yet applied
        "after-planner",  # the planner answered, nothing written yet
        "after-write-back",  # the iteration row and ledger committed, echo not yet seen
    }
)

_armed: dict[str, int] = {}


def configure(spec: str | None) -> None:
    """Parse `name=n,name2=m` (n: kill on the n-th pass, default 1)."""
    _armed.clear()
    if not spec:
        return
    for part in spec.split(","):
        name, _, count = part.strip().partition("=")
        if name not in KNOWN:
            raise ConfigurationError(
                "MISSION_RUNNER_FAILPOINTS",
                f"unknown fail point {name!r}; known: " + ", ".join(sorted(KNOWN)),
            )
        try:
            _armed[name] = int(count) if count else 1
        except ValueError:
            raise ConfigurationError(
                "MISSION_RUNNER_FAILPOINTS", f"{part!r}: count must be a number"
            ) from None


def hit(name: str) -> None:
    remaining = _armed.get(name)
    if remaining is None:
        return
    if remaining <= 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _armed[name] = remaining - 1
