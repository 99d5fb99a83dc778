"""`mission-runner demo`: synthetic users editing missions and agents in `sync_changes`.

They write the way the web app does: inside withUser (`app.current_user_id`), whole records
on insert with `field_meta = {}`, changed fields with object stamps on update. Like the web
app, after an iteration arrives they move the mission's `nextRunAt` on by its cadence (the
demo learns of iterations from the runtime's recent dispatches, not by reading the log).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import psycopg

from core.aio import sleep_or_stop
from core.clock import Clock
from planner.runtime import MissionRuntime

log = logging.getLogger(__name__)

TITLES = [
    "Weekly review of open tasks",
    "Summarise my journal",
    "Plan tomorrow",
    "Draft goals for Q3",
    "Tidy up notes on the garden project",
    "Prepare the team meeting agenda",
    "Check calendar conflicts",
    "Reading list digest",
]
CADENCES: list[dict[str, object]] = [
    {"kind": "interval", "everyMinutes": 1},
    {"kind": "daily", "atHour": 8, "atMinute": 0},
    {"kind": "weekly", "dayOfWeek": 1, "atHour": 9},
    {"kind": "manual"},
]


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def write_change(
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    *,
    user_id: str,
    table: str,
    record_id: str,
    op: str,
    data: dict[str, object] | None,
    field_meta: dict[str, object],
    client_id: str = "demo-web",
    origin: str = "user",
) -> None:
    """Append one row to sync_changes inside withUser(user_id)."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('app.current_user_id', %s, true)", (user_id,))
        await conn.execute(
            "INSERT INTO public.sync_changes (app_id, table_name, record_id, user_id, op, data,"
            " field_meta, client_id, origin) VALUES ('ai', %s, %s, %s, %s, %s::jsonb,"
            " %s::jsonb, %s, %s)",
            (
                table,
                record_id,
                user_id,
                op,
                None if data is None else orjson.dumps(data).decode(),
                orjson.dumps(field_meta).decode(),
                client_id,
                origin,
            ),
        )


class DemoUsers:
    """A handful of users creating agents and missions, then editing them now and then."""

    def __init__(
        self,
        *,
        dsn: str,
        clock: Clock,
        users: int = 4,
        seed: int = 7,
        runtime: MissionRuntime | None = None,
    ) -> None:
        self.dsn = dsn
        self.clock = clock
        self.runtime = runtime
        self._advanced: set[tuple[str, str, int]] = set()
        self.rng = random.Random(seed)
        self.users = [f"demo-user-{i + 1}" for i in range(users)]
        self.agents: dict[str, list[str]] = {}
        self.missions: dict[str, list[str]] = {}
        self.writes = 0

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now_us() / 1_000_000, UTC)

    def _stamp(self) -> dict[str, object]:
        return {"at": _iso(self._now()), "actor": {"kind": "user"}, "origin": "user"}

    async def seed(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        for user in self.users:
            agent_id = f"agent-{uuid.uuid4().hex[:8]}"
            self.agents[user] = [agent_id]
            await write_change(
                conn,
                user_id=user,
                table="agents",
                record_id=agent_id,
                op="insert",
                data={
                    "id": agent_id,
                    "name": self.rng.choice(["Ada", "Brook", "Cleo", "Dev"]),
                    "role": "A careful assistant that plans small, reviewable steps.",
                    "policy": {"tools": {}, "defaultsByModule": {}, "defaultForAi": "propose"},
                    "maxConcurrentMissions": 1,
                    "maxTokensPerDay": 50_000,
                    "state": "active",
                },
                field_meta={},
            )
            self.missions[user] = []
            for _ in range(2):
                await self._new_mission(conn, user)

    async def _new_mission(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]], user: str
    ) -> None:
        mission_id = f"mission-{uuid.uuid4().hex[:8]}"
        self.missions[user].append(mission_id)
        due = self._now() + timedelta(seconds=self.rng.randint(3, 30))
        await write_change(
            conn,
            user_id=user,
            table="aiMissions",
            record_id=mission_id,
            op="insert",
            data={
                "id": mission_id,
                "title": self.rng.choice(TITLES),
                "conceptMarkdown": "Look at what changed since last time and propose steps.",
                "objective": "Keep my week on track",
                "inputs": [],
                "cadence": self.rng.choice(CADENCES),
                "state": "active",
                "nextRunAt": _iso(due),
                "iterations": [],
                "agentId": self.agents[user][0],
            },
            field_meta={},
        )
        self.writes += 1

    async def advance_after_iterations(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]]
    ) -> None:
        """The web app's part: a finished iteration moves nextRunAt to the next occurrence."""
        if self.runtime is None:
            return
        for record in list(self.runtime.recent):
            key = (record.user_id, record.mission_id, record.occurrence_us)
            if record.outcome not in {"written", "failed"} or key in self._advanced:
                continue
            self._advanced.add(key)
            due = self._now() + timedelta(seconds=self.rng.randint(20, 60))
            await write_change(
                conn,
                user_id=record.user_id,
                table="aiMissions",
                record_id=record.mission_id,
                op="update",
                data={"nextRunAt": _iso(due)},
                field_meta={"nextRunAt": self._stamp()},
            )
            self.writes += 1

    async def step(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        user = self.rng.choice(self.users)
        missions = self.missions[user]
        action = self.rng.random()
        if action < 0.1 or not missions:
            await self._new_mission(conn, user)
        elif action < 0.75:
            mission_id = self.rng.choice(missions)
            await write_change(
                conn,
                user_id=user,
                table="aiMissions",
                record_id=mission_id,
                op="update",
                data={"title": self.rng.choice(TITLES)},
                field_meta={"title": self._stamp()},
            )
        elif action < 0.9:
            mission_id = self.rng.choice(missions)
            state = self.rng.choice(["active", "active", "paused"])
            await write_change(
                conn,
                user_id=user,
                table="aiMissions",
                record_id=mission_id,
                op="update",
                data={"state": state},
                field_meta={"state": self._stamp()},
            )
        elif len(missions) > 1:
            mission_id = missions.pop(self.rng.randrange(len(missions)))
            await write_change(
                conn,
                user_id=user,
                table="aiMissions",
                record_id=mission_id,
                op="delete",
                data={"deletedAt": _iso(self._now())},
                field_meta={},
            )
        self.writes += 1

    async def run(self, stop: asyncio.Event, *, interval: float = 1.0) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await self.seed(conn)
            log.info("demo: %d users seeded with agents and missions", len(self.users))
            while not await sleep_or_stop(stop, interval * self.rng.uniform(0.5, 1.5)):
                await self.advance_after_iterations(conn)
                await self.step(conn)
