"""Named fail points for crash tests (`MISSION_RUNNER_FAILPOINTS`) and hold points for
in-process tests.

`FailPoints("after-persist=3")` makes the process SIGKILL itself the third time it passes
the `after-persist` point. The composition root builds one from the settings and hands it to
the collaborators that carry points; without a spec (production), `hit()` is a dict lookup.
The points mark the places where a crash must not lose or duplicate anything.

Hold points (`HOLDS`) pause an asynchronous step where a test needs to act in between
(write rows while the initial load holds its snapshot open, say): a test calls
`hold(name)` and releases it when done; code passes `await points.passing(name)`, which
returns at once unless a test holds that point.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field

from core.errors import ConfigurationError

KNOWN = frozenset(
    {
        "after-persist",  # the batch and checkpoint committed, not yet confirmed
        "before-apply-large",  # a transaction of >= 1000 rows received, not yet applied
        "after-planner",  # the planner answered, nothing written yet
        "after-write-back",  # the iteration row and ledger committed, echo not yet seen
    }
)

HOLDS = frozenset(
    {
        "load-snapshot",  # the initial load has its snapshot and is about to read the table
    }
)


@dataclass(slots=True)
class Hold:
    """A held point: `reached` is set when the code arrives, which then waits for
    `release()`."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


class FailPoints:
    """Parsed `name=n,name2=m` (n: act on the n-th pass, default 1)."""

    __slots__ = ("_armed", "_holds")

    def __init__(self, spec: str | None = None) -> None:
        self._armed: dict[str, int] = {}
        self._holds: dict[str, Hold] = {}
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
                self._armed[name] = int(count) if count else 1
            except ValueError:
                raise ConfigurationError(
                    "MISSION_RUNNER_FAILPOINTS", f"{part!r}: count must be a number"
                ) from None

    def hit(self, name: str) -> None:
        """Kill the process when `name` is passed for the configured time."""
        remaining = self._armed.get(name)
        if remaining is None:
            return
        if remaining <= 1:
            os.kill(os.getpid(), signal.SIGKILL)
        self._armed[name] = remaining - 1

    def hold(self, name: str) -> Hold:
        """Make the next pass of hold point `name` wait until the returned hold is released."""
        if name not in HOLDS:
            raise ValueError(f"unknown hold point {name!r}; known: {', '.join(sorted(HOLDS))}")
        hold = self._holds[name] = Hold()
        return hold

    async def passing(self, name: str) -> None:
        """Pass hold point `name`: returns at once unless a test holds it."""
        hold = self._holds.pop(name, None)
        if hold is None:
            return
        hold.reached.set()
        await hold.released.wait()
