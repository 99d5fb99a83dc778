"""Due-ness of missions and their occurrences (domain.md §3). Pure.

A mission is due when `state == 'active'`, `nextRunAt` is present and `<= now`, and it has no
`deletedAt`. Decision: each *occurrence* `(mission, nextRunAt)` is planned at most once; the
web app moving `nextRunAt` makes a new occurrence. An occurrence is keyed by the instant of
`nextRunAt`, so `…00Z` and `…00.000Z` are the same occurrence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.instants import iso_ms, parse_stamp
from core.json_types import JsonValue

MissionKey = tuple[str, str]  # (user_id, mission_id)


@dataclass(frozen=True, slots=True, order=True)
class Occurrence:
    """One scheduled run of a mission: the instant of its `nextRunAt`. `key` is the
    mission's `(user_id, mission_id)`, one tuple shared by every structure that indexes it."""

    at_us: int
    key: MissionKey

    @property
    def user_id(self) -> str:
        return self.key[0]

    @property
    def mission_id(self) -> str:
        return self.key[1]

    @property
    def at_iso(self) -> str:
        return iso_ms(self.at_us)


def _deleted(value: JsonValue) -> bool:
    return value is not None and value is not False and value != ""


def occurrence_of(key: MissionKey, values: Mapping[str, JsonValue]) -> Occurrence | None:
    """The occurrence this mission is scheduled for, due or not; None when it is not
    schedulable (not active, no or unparseable nextRunAt, soft-deleted)."""
    if values.get("state") != "active":
        return None
    if _deleted(values.get("deletedAt")):
        return None
    next_run = values.get("nextRunAt")
    if not isinstance(next_run, str):
        return None
    at = parse_stamp(next_run)
    if at is None:
        return None
    return Occurrence(at, key)
