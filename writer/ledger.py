"""The dispatch ledger: one row per occurrence `(user, mission, nextRunAt)` ever planned.

Statuses: `planning` (claimed; `attempts` counts planner attempts, durable so a crash loop
cannot retry forever), `written` (the iteration row was appended), `failed` (a failed
iteration was appended after the configured attempts), `abandoned` (the mission changed while
it was being planned; not done, may run again). `written` and `failed` are final.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection

from core.instants import datetime_to_us, us_to_datetime

FINAL = frozenset({"written", "failed"})


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    user_id: str
    mission_id: str
    occurrence_us: int
    iteration_id: str | None
    status: str
    attempts: int
    last_error: str | None

    @property
    def final(self) -> bool:
        return self.status in FINAL


def _entry(row: tuple[object, ...]) -> LedgerEntry:
    occurrence = row[2]
    assert isinstance(occurrence, datetime)
    return LedgerEntry(
        user_id=str(row[0]),
        mission_id=str(row[1]),
        occurrence_us=datetime_to_us(occurrence),
        iteration_id=None if row[3] is None else str(row[3]),
        status=str(row[4]),
        attempts=int(str(row[5])),
        last_error=None if row[6] is None else str(row[6]),
    )


_COLUMNS = "user_id, mission_id, occurrence, iteration_id, status, attempts, last_error"


async def load_latest_final(conn: AsyncConnection[tuple[object, ...]]) -> list[LedgerEntry]:
    """Per mission, the latest finished occurrence. Enough in memory: `nextRunAt` moves
    forward, and `claim` (the database) stays the authority for any older occurrence."""
    cur = await conn.execute(
        f"SELECT DISTINCT ON (user_id, mission_id) {_COLUMNS} FROM mana_ai.dispatch_ledger"
        " WHERE status IN ('written', 'failed')"
        " ORDER BY user_id, mission_id, occurrence DESC"
    )
    return [_entry(row) for row in await cur.fetchall()]


async def claim(
    conn: AsyncConnection[tuple[object, ...]],
    user_id: str,
    mission_id: str,
    occurrence_us: int,
    iteration_id: str,
) -> LedgerEntry:
    """Record one more planning attempt for the occurrence and return its row. A finished
    occurrence is returned unchanged (the caller must not plan it)."""
    cur = await conn.execute(
        "INSERT INTO mana_ai.dispatch_ledger AS l"
        " (user_id, mission_id, occurrence, iteration_id, status, attempts, updated_at)"
        " VALUES (%s, %s, %s, %s, 'planning', 1, now())"
        " ON CONFLICT (user_id, mission_id, occurrence) DO UPDATE SET"
        "  attempts = l.attempts + CASE WHEN l.status IN ('written', 'failed') THEN 0 ELSE 1 END,"
        "  status = CASE WHEN l.status IN ('written', 'failed') THEN l.status"
        "   ELSE 'planning' END,"
        "  updated_at = now()"
        f" RETURNING {_COLUMNS}",
        (user_id, mission_id, us_to_datetime(occurrence_us), iteration_id),
    )
    row = await cur.fetchone()
    assert row is not None
    return _entry(row)


async def note_error(
    conn: AsyncConnection[tuple[object, ...]],
    user_id: str,
    mission_id: str,
    occurrence_us: int,
    error: str,
    *,
    status: str = "planning",
) -> None:
    await conn.execute(
        "UPDATE mana_ai.dispatch_ledger SET last_error = %s, status = %s, updated_at = now()"
        " WHERE user_id = %s AND mission_id = %s AND occurrence = %s"
        " AND status NOT IN ('written', 'failed')",
        (error[:2000], status, user_id, mission_id, us_to_datetime(occurrence_us)),
    )


async def prune(conn: AsyncConnection[tuple[object, ...]], *, older_than_days: int) -> int:
    """Delete old rows, always keeping each mission's latest occurrence."""
    cur = await conn.execute(
        "DELETE FROM mana_ai.dispatch_ledger l"
        " WHERE l.updated_at < now() - make_interval(days => %s)"
        " AND EXISTS (SELECT 1 FROM mana_ai.dispatch_ledger n WHERE n.user_id = l.user_id"
        "  AND n.mission_id = l.mission_id AND n.occurrence > l.occurrence)",
        (older_than_days,),
    )
    return cur.rowcount
