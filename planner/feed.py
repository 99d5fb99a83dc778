"""The hand-off of snapshot changes from the ingest to the mission runtime.

The ingest publishes the keys of the missions and agents each applied transaction (or load)
changed; the runtime takes them, in its own task, and re-indexes those missions. A key is
held once however often it changed before the runtime took it (the runtime reads the
latest state when it takes it), so the feed is bounded by the number of records and
publishing never waits.

`settled` is clear while a large transaction is being applied in steps: the snapshots then
hold part of it, and the runtime does not judge missions until it is set again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from opentelemetry.trace import SpanContext

from planner.budget import AgentKey
from planner.due import MissionKey


@dataclass(slots=True)
class Changes:
    """What changed since the last take: each mission with the ingest batch that changed it
    last (for the dispatch span's link), and the agents."""

    missions: dict[MissionKey, SpanContext | None] = field(default_factory=dict)
    agents: set[AgentKey] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.missions or self.agents)


class ChangeFeed:
    def __init__(self) -> None:
        self._changes = Changes()
        self._ready = asyncio.Event()
        self.settled = asyncio.Event()
        self.settled.set()

    def publish(
        self,
        missions: Iterable[MissionKey],
        agents: Iterable[AgentKey],
        batch: SpanContext | None = None,
    ) -> None:
        held = self._changes.missions
        for key in missions:
            held[key] = batch
        self._changes.agents.update(agents)
        if self._changes:
            self._ready.set()

    def take_nowait(self) -> Changes:
        changes, self._changes = self._changes, Changes()
        self._ready.clear()
        return changes

    async def take(self) -> Changes:
        """Wait for changes and take them all."""
        await self._ready.wait()
        return self.take_nowait()

    def reset(self) -> None:
        """Forget what was published (the snapshots were reloaded; the runtime re-indexes
        everything)."""
        self.take_nowait()
