"""Writing a mission iteration back to `sync_changes`, exactly once (domain.md §6).

Invariant: the `sync_changes` row, the ledger row turning final and the token usage are
written in ONE transaction, under a row lock on the ledger row and behind the leader's fence
(`writer.fence`), and the iteration id is derived from the occurrence. A crash at any point,
a replay, a retry or a deposed instance therefore never appends a second iteration for the
same occurrence.

Every timestamp written here is in JS `toISOString()` form (`core.instants.iso_ms`), as the
web app writes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import orjson
from psycopg import AsyncConnection

from core.instants import iso_ms, us_to_datetime
from core.json_types import JsonValue
from core.sync_changes import CLIENT_ID
from writer.fence import Fence
from writer.ledger import FINAL
from writer.with_user import with_user

_NAMESPACE: Final = uuid.UUID("5b0f3a4e-2d1c-4f7b-9a63-6d2a1e0c9b11")


def iteration_id_for(user_id: str, mission_id: str, occurrence_us: int) -> str:
    """The same occurrence always yields the same iteration id."""
    return str(uuid.uuid5(_NAMESPACE, f"{user_id}\x1f{mission_id}\x1f{occurrence_us}"))


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One proposed tool call of a plan (the one plan-step type: the planner makes them,
    the iteration carries them). `params` is the decoded JSON object; nobody mutates it.
    `summary` is the line the user reads; `module` and `policy` come from the tool catalog
    (`policy` is the resolved `auto`/`propose`)."""

    tool_name: str
    params: dict[str, JsonValue]
    summary: str
    module: str = ""
    policy: str = "propose"


def build_iteration(
    *,
    iteration_id: str,
    started_us: int,
    finished_us: int,
    summary: str,
    steps: Sequence[PlanStep],
    error: dict[str, JsonValue] | None = None,
) -> dict[str, JsonValue]:
    """The iteration record (domain.md §3). With `error`, a failed iteration the user sees."""
    plan: list[JsonValue] = [
        {
            "id": f"{iteration_id}-{i}",
            "summary": step.summary,
            "intent": {"kind": "toolCall", "toolName": step.tool_name, "params": step.params},
            "status": "planned",
        }
        for i, step in enumerate(steps)
    ]
    iteration: dict[str, JsonValue] = {
        "id": iteration_id,
        "startedAt": iso_ms(started_us),
        "finishedAt": iso_ms(finished_us),
        "plan": plan,
        "summary": summary,
        "overallStatus": "approved" if not plan else "awaiting-review",
        "source": "server",
    }
    if error is not None:
        iteration["overallStatus"] = "failed"
        iteration["errorDetails"] = error
    return iteration


def build_actor(
    *,
    agent_id: str,
    agent_name: str,
    mission_id: str,
    iteration_id: str,
    rationale: JsonValue,
) -> dict[str, JsonValue]:
    return {
        "kind": "ai",
        "principalId": agent_id,
        "displayName": agent_name,
        "missionId": mission_id,
        "iterationId": iteration_id,
        "rationale": rationale if isinstance(rationale, str) else "",
    }


@dataclass(frozen=True, slots=True)
class WriteBack:
    user_id: str
    mission_id: str
    occurrence_us: int
    iteration: dict[str, JsonValue]
    previous_iterations: list[JsonValue]
    actor: dict[str, JsonValue]
    final_status: str  # 'written' or 'failed'
    now_us: int
    usage_agent_id: str | None = None  # None: no token usage row (legacy agent, or 0 tokens)
    tokens: int = 0


async def write_back(
    conn: AsyncConnection[tuple[object, ...]], wb: WriteBack, fence: Fence
) -> bool:
    """Append the iteration; False when the occurrence was already final (nothing written).
    FencedError (nothing written) when this instance no longer leads."""
    assert wb.final_status in FINAL
    iteration_id = wb.iteration["id"]
    occurrence = us_to_datetime(wb.occurrence_us)
    async with with_user(conn, wb.user_id):
        await fence.check(conn)
        cur = await conn.execute(
            "SELECT status FROM mana_ai.dispatch_ledger"
            " WHERE user_id = %s AND mission_id = %s AND occurrence = %s FOR UPDATE",
            (wb.user_id, wb.mission_id, occurrence),
        )
        row = await cur.fetchone()
        if row is None:
            await conn.execute(
                "INSERT INTO mana_ai.dispatch_ledger (user_id, mission_id, occurrence,"
                " iteration_id, status, attempts) VALUES (%s, %s, %s, %s, 'planning', 1)",
                (wb.user_id, wb.mission_id, occurrence, iteration_id),
            )
        elif str(row[0]) in FINAL:
            return False
        data = {"iterations": [*wb.previous_iterations, wb.iteration]}
        await conn.execute(
            "INSERT INTO public.sync_changes (app_id, table_name, record_id, user_id, op, data,"
            " field_meta, client_id, schema_version, actor, origin)"
            " VALUES ('ai', 'aiMissions', %s, %s, 'update', %s::jsonb, %s::jsonb, %s, 1,"
            " %s::jsonb, 'agent')",
            (
                wb.mission_id,
                wb.user_id,
                orjson.dumps(data).decode(),
                orjson.dumps({"iterations": iso_ms(wb.now_us)}).decode(),
                CLIENT_ID,
                orjson.dumps(wb.actor).decode(),
            ),
        )
        await conn.execute(
            "UPDATE mana_ai.dispatch_ledger SET status = %s, iteration_id = %s,"
            " updated_at = now() WHERE user_id = %s AND mission_id = %s AND occurrence = %s",
            (wb.final_status, iteration_id, wb.user_id, wb.mission_id, occurrence),
        )
        if wb.usage_agent_id is not None and wb.tokens > 0:
            await conn.execute(
                "INSERT INTO mana_ai.token_usage (user_id, agent_id, mission_id, tokens, ts)"
                " VALUES (%s, %s, %s, %s, %s)",
                (
                    wb.user_id,
                    wb.usage_agent_id,
                    wb.mission_id,
                    wb.tokens,
                    us_to_datetime(wb.now_us),
                ),
            )
    return True
