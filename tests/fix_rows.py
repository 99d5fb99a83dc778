"""Test helpers for the merge: rows as the sync service writes them, folding rows into a
state, and stamp texts the grammar accepts (with their UTC form) and rejects."""

from __future__ import annotations

from collections.abc import Sequence

from core.instants import parse_stamp
from core.json_types import JsonValue
from core.sync_changes import APP_ID, MISSIONS_TABLE
from projections.merge import RecordState, apply_row
from projections.rows import ChangeRow

NOW = "2026-04-15T12:00:00Z"
DAY = "2026-04-15T00:00:00Z"


def us(text: str) -> int:
    value = parse_stamp(text)
    assert value is not None, text
    return value


_counter = iter(range(1, 1_000_000))


def row(
    op: str,
    data: dict[str, JsonValue] | None,
    meta: dict[str, JsonValue] | None = None,
    *,
    created: str = DAY,
    event: str | None = None,
    record: str = "m1",
    user: str = "u1",
    table: str = MISSIONS_TABLE,
) -> ChangeRow:
    return ChangeRow(
        event_id=event if event is not None else f"ev-{next(_counter):06d}",
        app_id=APP_ID,
        table_name=table,
        record_id=record,
        user_id=user,
        op=op,
        data=data,
        field_meta={} if meta is None else meta,
        created_at_us=us(created),
    )


def fold(rows: Sequence[ChangeRow], user: str = "u1", record: str = "m1") -> RecordState:
    state = RecordState(user, record)
    for r in rows:
        apply_row(state, r)
    return state


def stamped(data: dict[str, JsonValue], stamp: JsonValue) -> dict[str, JsonValue]:
    return {k: stamp for k in data}


ACCEPTED = {
    "2026-04-15T12:00:00Z": "2026-04-15T12:00:00.000Z",
    "2026-04-15T12:00:00.5Z": "2026-04-15T12:00:00.500Z",
    "2026-04-15T12:00:00.123456Z": "2026-04-15T12:00:00.123456Z",
    "2026-04-15T12:00:00.123456789Z": "2026-04-15T12:00:00.123456Z",
    "2026-04-15T12:00:00.1234Z": "2026-04-15T12:00:00.123400Z",
    "2026-04-15 12:00:00+00": "2026-04-15T12:00:00.000Z",
    "2026-04-15T14:00:00+0200": "2026-04-15T12:00:00.000Z",
    "2026-04-15T14:00:00+02:00": "2026-04-15T12:00:00.000Z",
    "2026-04-15T06:30:00-05:30": "2026-04-15T12:00:00.000Z",
    "2026-04-15T12:00:00-00:00": "2026-04-15T12:00:00.000Z",
    "2026-04-16T00:30:00+23:59": "2026-04-15T00:31:00.000Z",
    "0001-01-01T00:30:00+01:00": "0000-12-31T23:30:00.000Z",
    "2024-02-29T00:00:00Z": "2024-02-29T00:00:00.000Z",
}

REJECTED = [
    "2026-04-15",
    "2026-04-15T12:00:00",
    "2026-04-15T12:00Z",
    "2026-04-15t12:00:00z",
    "2026-04-15X12:00:00Z",
    "20260415T120000Z",
    "2026-W16-3T12:00:00Z",
    "2026-04-15T12:00:00.Z",
    "2026-04-15T12:00:00.1234567890Z",
    "2026-04-15T23:59:60Z",
    "2026-04-15T24:00:00Z",
    "2026-13-01T00:00:00Z",
    "2025-02-29T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "2026-04-15T12:00:00+24:00",
    "2026-04-15T12:00:00+02:60",
    "2026-04-15T12:00:00+0260",
    "2026-04-15T12:00:00+2400",
    "2026-04-15T12:00:00Z ",
    " 2026-04-15T12:00:00Z",
    "2026-04-15T12:00:00Z\n",
    "\uff12\uff10\uff12\uff16-04-15T12:00:00Z"  # full-width digits,
    "",
    "x" * 10_000,
]
