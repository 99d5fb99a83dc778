"""The dispatch ledger: one row per occurrence `(user, mission, nextRunAt)` ever planned.

Statuses: `planning` (claimed; `attempts` counts planning attempts, durable so a crash loop
cannot retry forever), `written` (the iteration row was appended), `failed` (a failed
iteration was appended after the configured attempts, or the attempts ran out and not even
that could be written: `last_error` says why), `abandoned` (the mission changed while it
was being planned; not done, may run again). `written` and `failed` are final.

Every write runs behind the leader's fence (`writer.fence`): a deposed instance changes
nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.rows import class_row

from core.instants import datetime_to_us, us_to_datetime
from writer.errors import FencedError
from writer.fence import Fence

FINAL = frozenset({"written", "failed"})


@dataclass(frozen=True, slots=True)
class _Row:
    user_id: str
    mission_id: str
    occurrence: datetime
    iteration_id: str | None
    status: str
    attempts: int
    last_error: str | None


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

    @classmethod
    def of(cls, row: _Row) -> LedgerEntry:
        return cls(
            row.user_id,
            row.mission_id,
            datetime_to_us(row.occurrence),
            row.iteration_id,
            row.status,
            row.attempts,
            row.last_error,
        )


_COLUMNS = "user_id, mission_id, occurrence, iteration_id, status, attempts, last_error"


async def load_latest_final(conn: AsyncConnection[tuple[object, ...]]) -> list[LedgerEntry]:
    """Per mission, the latest finished occurrence. Enough in memory: `nextRunAt` moves
    forward, and `claim` (the database) stays the authority for any older occurrence."""
    async with conn.cursor(row_factory=class_row(_Row)) as cur:
        await cur.execute(
            f"SELECT DISTINCT ON (user_id, mission_id) {_COLUMNS} FROM mana_ai.dispatch_ledger"
            " WHERE status IN ('written', 'failed')"
            " ORDER BY user_id, mission_id, occurrence DESC"
        )
        return [LedgerEntry.of(row) for row in await cur.fetchall()]


async def claim(
    conn: AsyncConnection[tuple[object, ...]],
    fence: Fence,
    user_id: str,
    mission_id: str,
    occurrence_us: int,
    iteration_id: str,
) -> LedgerEntry:
    """Record one more planning attempt for the occurrence and return its row. A finished
    occurrence is returned unchanged (the caller must not plan it). One statement: the
    fence's check (`FOR KEY SHARE` on the slot's checkpoint row, see writer.fence) and the
    upsert, in the statement's own transaction."""
    async with conn.cursor(row_factory=class_row(_Row)) as cur:
        await cur.execute(
            "WITH leader AS (SELECT epoch FROM mana_ai.stream_checkpoint"
            "  WHERE slot_name = %s AND epoch = %s FOR KEY SHARE)"
            " INSERT INTO mana_ai.dispatch_ledger AS l"
            " (user_id, mission_id, occurrence, iteration_id, status, attempts, updated_at)"
            " SELECT %s, %s, %s, %s, 'planning', 1, now() FROM leader"
            " ON CONFLICT (user_id, mission_id, occurrence) DO UPDATE SET"
            "  attempts = l.attempts"
            "   + CASE WHEN l.status IN ('written', 'failed') THEN 0 ELSE 1 END,"
            "  status = CASE WHEN l.status IN ('written', 'failed') THEN l.status"
            "   ELSE 'planning' END,"
            "  updated_at = now()"
            f" RETURNING {_COLUMNS}",
            (
                fence.slot,
                fence.epoch,
                user_id,
                mission_id,
                us_to_datetime(occurrence_us),
                iteration_id,
            ),
        )
        row = await cur.fetchone()
    if row is None:  # the fence did not pass: nothing was written
        async with conn.transaction():
            await fence.check(conn)  # raises FencedError with the epoch it found
        raise FencedError(fence.slot, fence.epoch, None)
    return LedgerEntry.of(row)


async def note_error(
    conn: AsyncConnection[tuple[object, ...]],
    fence: Fence,
    user_id: str,
    mission_id: str,
    occurrence_us: int,
    error: str,
    *,
    status: str = "planning",
) -> None:
    """Record `error` on an occurrence that is not final (and set its status)."""
    async with conn.transaction():
        await fence.check(conn)
        await conn.execute(
            "INSERT INTO mana_ai.dispatch_ledger AS l"
            " (user_id, mission_id, occurrence, status, attempts, last_error, updated_at)"
            " VALUES (%s, %s, %s, %s, 0, %s, now())"
            " ON CONFLICT (user_id, mission_id, occurrence) DO UPDATE SET"
            "  last_error = EXCLUDED.last_error, status = EXCLUDED.status, updated_at = now()"
            " WHERE l.status NOT IN ('written', 'failed')",
            (user_id, mission_id, us_to_datetime(occurrence_us), status, error[:2000]),
        )


async def prune(
    conn: AsyncConnection[tuple[object, ...]], fence: Fence, *, older_than_days: int
) -> int:
    """Delete old rows, always keeping each mission's latest occurrence."""
    async with conn.transaction():
        await fence.check(conn)
        cur = await conn.execute(
            "DELETE FROM mana_ai.dispatch_ledger l"
            " WHERE l.updated_at < now() - make_interval(days => %s)"
            " AND EXISTS (SELECT 1 FROM mana_ai.dispatch_ledger n WHERE n.user_id = l.user_id"
            "  AND n.mission_id = l.mission_id AND n.occurrence > l.occurrence)",
            (older_than_days,),
        )
        return cur.rowcount
