"""What the mission runtime reads of the snapshots: the latest merged mission and agent
records. The projections own the stores; the composition root hands the runtime an object
with these methods (structurally typed), so the runtime never depends on how they are kept.

Every call reads the state as applied at that moment (applying and judging run on one event
loop); the mappings returned are the live ones: read them before the next await, never
mutate them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from core.json_types import JsonValue
from planner.due import MissionKey


class Snapshots(Protocol):
    def mission(self, key: MissionKey) -> Mapping[str, JsonValue] | None:
        """The mission's merged fields; None when it never existed or has a tombstone. A
        soft-deleted mission (`deletedAt` set) is returned; due-ness filters it."""
        ...

    def agent(self, user_id: str, agent_id: str) -> Mapping[str, JsonValue] | None:
        """The agent record; None when it is missing, deleted or has `deletedAt` set."""
        ...

    def mission_keys(self) -> Iterable[MissionKey]:
        """Every mission held (for re-indexing after a load)."""
        ...
