"""Token usage rows (`mana_ai.token_usage`): loaded for the rolling 24-hour window at start,
appended by the write-back transaction, pruned after 48 hours (domain.md §4, Decision)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection

from core.instants import datetime_to_us

KEEP_HOURS = 48


@dataclass(frozen=True, slots=True)
class Usage:
    user_id: str
    agent_id: str
    tokens: int
    ts_us: int


async def load_window(conn: AsyncConnection[tuple[object, ...]], *, hours: int = 24) -> list[Usage]:
    cur = await conn.execute(
        "SELECT user_id, agent_id, tokens, ts FROM mana_ai.token_usage"
        " WHERE ts > now() - make_interval(hours => %s) ORDER BY ts",
        (hours,),
    )
    out = []
    for user_id, agent_id, tokens, ts in await cur.fetchall():
        assert isinstance(ts, datetime)
        out.append(Usage(str(user_id), str(agent_id), int(str(tokens)), datetime_to_us(ts)))
    return out


async def prune(conn: AsyncConnection[tuple[object, ...]]) -> int:
    cur = await conn.execute(
        "DELETE FROM mana_ai.token_usage WHERE ts < now() - make_interval(hours => %s)",
        (KEEP_HOURS,),
    )
    return cur.rowcount
