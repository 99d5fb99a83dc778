"""Token usage rows (`mana_ai.token_usage`): loaded for the rolling 24-hour window at start,
appended by the write-back transaction, pruned after 48 hours (domain.md §4, Decision)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.rows import class_row

from core.instants import datetime_to_us
from writer.fence import Fence

KEEP_HOURS = 48


@dataclass(frozen=True, slots=True)
class Usage:
    user_id: str
    agent_id: str
    tokens: int
    ts_us: int


@dataclass(frozen=True, slots=True)
class _Row:
    user_id: str
    agent_id: str
    tokens: int
    ts: datetime


async def load_window(conn: AsyncConnection[tuple[object, ...]], *, hours: int = 24) -> list[Usage]:
    async with conn.cursor(row_factory=class_row(_Row)) as cur:
        await cur.execute(
            "SELECT user_id, agent_id, tokens, ts FROM mana_ai.token_usage"
            " WHERE ts > now() - make_interval(hours => %s) ORDER BY ts",
            (hours,),
        )
        return [
            Usage(r.user_id, r.agent_id, r.tokens, datetime_to_us(r.ts))
            for r in await cur.fetchall()
        ]


async def prune(conn: AsyncConnection[tuple[object, ...]], fence: Fence) -> int:
    async with conn.transaction():
        await fence.check(conn)
        cur = await conn.execute(
            "DELETE FROM mana_ai.token_usage WHERE ts < now() - make_interval(hours => %s)",
            (KEEP_HOURS,),
        )
        return cur.rowcount
