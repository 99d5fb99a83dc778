"""Helpers for tests against a real server: the dev schema, writers, the service in-process
and as a separate process, and a full recomputation of the snapshots from `sync_changes`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from core.lsn import Lsn
from core.sync_changes import COLUMNS
from mission_runner.app import App, open_app
from mission_runner.cli import prepare_database
from mission_runner.devschema import DDL
from mission_runner.metrics import Metrics
from mission_runner.settings import Settings
from planner.runtime import MissionRuntime
from projections.ingest import Ingest
from projections.merge import to_record
from projections.projector import Outcome, Projector
from projections.stores import SnapshotStore
from stream.supervisor import Supervisor
from tests.fix_pg import TestDatabase

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(pg_db: TestDatabase) -> TestDatabase:
    """A fresh database with the development `sync_changes` schema."""
    with pg_db.connect() as conn:
        conn.execute(DDL.encode())
    return pg_db


def settings_for(db: TestDatabase, **overrides: Any) -> Settings:
    base = Settings(
        database_url=db.dsn,
        slot=db.slot,
        status_interval=1.0,
        heartbeat_interval=0,
        batch_max_delay=0.02,
        reconnect_min_backoff=0.05,
        reconnect_max_backoff=0.5,
    )
    return replace(base, **overrides)


def service_env(db: TestDatabase, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSION_RUNNER_")}
    env.update(
        DATABASE_URL=db.dsn,
        MISSION_RUNNER_SLOT=db.slot,
        MISSION_RUNNER_STATUS_INTERVAL="1s",
        MISSION_RUNNER_BATCH_MAX_DELAY="20ms",
        MISSION_RUNNER_RECONNECT_MIN_BACKOFF="50ms",
        MISSION_RUNNER_RECONNECT_MAX_BACKOFF="500ms",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# -- writing sync_changes ---------------------------------------------------------------


@dataclass
class Change:
    user_id: str
    table: str
    record_id: str
    op: str
    data: object
    field_meta: object = None
    app_id: str = "ai"


def mission_insert(user: str, mission_id: str, **fields: Any) -> Change:
    data = {"id": mission_id, "title": "t", "state": "active", "iterations": [], **fields}
    return Change(user, "aiMissions", mission_id, "insert", data, {})


def stamp(iso: str) -> dict[str, Any]:
    return {"at": iso, "actor": {"kind": "user"}, "origin": "user"}


def _params(c: Change) -> tuple[object, ...]:
    return (
        c.app_id,
        c.table,
        c.record_id,
        c.user_id,
        c.op,
        None if c.data is None else orjson.dumps(c.data).decode(),
        orjson.dumps(c.field_meta if c.field_meta is not None else {}).decode(),
    )


INSERT_SQL = (
    "INSERT INTO public.sync_changes (app_id, table_name, record_id, user_id, op, data,"
    " field_meta, client_id) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, 'test')"
)


def write(db: TestDatabase, *changes: Change) -> None:
    """Commit the changes in one transaction, from a separate connection."""
    with psycopg.connect(db.dsn) as conn, conn.cursor() as cur:
        cur.executemany(INSERT_SQL, [_params(c) for c in changes])


async def awrite(db: TestDatabase, *changes: Change) -> None:
    async with await psycopg.AsyncConnection.connect(db.dsn) as conn:
        async with conn.cursor() as cur:
            await cur.executemany(INSERT_SQL, [_params(c) for c in changes])


def bulk_missions(
    db: TestDatabase,
    *,
    users: int,
    missions: int,
    updates: int,
    tx_size: int = 1000,
    seed: int = 1,
) -> int:
    """Insert `missions` missions spread over `users`, then `updates` title updates, in
    transactions of `tx_size` rows, server-side (fast). Returns the number of rows."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        total = 0
        for start in range(0, missions, tx_size):
            n = min(tx_size, missions - start)
            conn.execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                " field_meta, client_id)"
                " SELECT 'ai', 'aiMissions', 'm' || i, 'u' || (i %% %s), 'insert',"
                " jsonb_build_object('id', 'm' || i, 'title', 'mission ' || i,"
                "  'state', 'active', 'iterations', '[]'::jsonb), '{}', 'bulk'"
                " FROM generate_series(%s::int, %s::int) i",
                (users, start, start + n - 1),
            )
            total += n
        for start in range(0, updates, tx_size):
            n = min(tx_size, updates - start)
            conn.execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                " field_meta, client_id)"
                " SELECT 'ai', 'aiMissions', 'm' || (i %% %s), 'u' || ((i %% %s) %% %s),"
                " 'update', jsonb_build_object('title', 'update ' || i),"
                " jsonb_build_object('title', jsonb_build_object('at',"
                "  to_char((now() + i * interval '1 ms') AT TIME ZONE 'UTC',"
                "  'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))), 'bulk'"
                " FROM generate_series(%s::int, %s::int) i",
                (missions, missions, users, start, start + n - 1),
            )
            total += n
    return total


# -- comparing with a full recomputation ----------------------------------------------------

Snapshot = dict[str, dict[tuple[str, str], tuple[Any, bool]]]


def recompute(db: TestDatabase) -> Snapshot:
    """Fold every ai mission/agent row of sync_changes with the merge, from scratch."""
    missions, agents = SnapshotStore("mission"), SnapshotStore("agent")
    projector = Projector(missions=missions, agents=agents)
    cols = ", ".join(f"{c}::text" for c in COLUMNS)
    with psycopg.connect(db.dsn, options="-c timezone=UTC -c datestyle=ISO") as conn:
        cur = conn.cursor(binary=False)
        cur.execute(f"SELECT {cols} FROM sync_changes ORDER BY created_at, id")
        rows = [tuple(None if v is None else str(v).encode() for v in r) for r in cur]
    projector.apply_loaded(rows, tuple(range(len(COLUMNS))), Lsn(0), 0, Outcome())
    return {
        "mission": {(s.user_id, s.record_id): (to_record(s), s.deleted) for s in missions},
        "agent": {(s.user_id, s.record_id): (to_record(s), s.deleted) for s in agents},
    }


def persisted(db: TestDatabase) -> Snapshot:
    out: Snapshot = {"mission": {}, "agent": {}}
    with psycopg.connect(db.dsn) as conn:
        for kind, table, col in (
            ("mission", "mission_snapshots", "mission_id"),
            ("agent", "agent_snapshots", "agent_id"),
        ):
            for user, rid, record, deleted in conn.execute(
                f"SELECT user_id, {col}, record, deleted FROM mana_ai.{table}"
            ):
                out[kind][(str(user), str(rid))] = (record, bool(deleted))
    return out


def in_memory(app: App) -> Snapshot:
    ing = app.ingest
    return {
        "mission": {(s.user_id, s.record_id): (to_record(s), s.deleted) for s in ing.missions},
        "agent": {(s.user_id, s.record_id): (to_record(s), s.deleted) for s in ing.agents},
    }


def ai_row_count(db: TestDatabase) -> int:
    with psycopg.connect(db.dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM sync_changes WHERE app_id = 'ai'"
            " AND table_name IN ('aiMissions', 'agents')"
        ).fetchone()
        assert row is not None
        return int(row[0])


def checkpoint(db: TestDatabase) -> Lsn | None:
    with psycopg.connect(db.dsn) as conn:
        row = conn.execute(
            "SELECT lsn::text FROM mana_ai.stream_checkpoint WHERE slot_name = %s", (db.slot,)
        ).fetchone()
    return None if row is None else Lsn.parse(str(row[0]))


def slot_row(db: TestDatabase) -> dict[str, Any] | None:
    with psycopg.connect(db.dsn) as conn:
        cur = conn.execute(
            "SELECT active, confirmed_flush_lsn::text, restart_lsn::text, wal_status,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (db.slot,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        names = [d.name for d in cur.description or []]
        return dict(zip(names, row, strict=True))


async def eventually(
    predicate: Callable[[], bool], within: float = 20.0, what: str = "condition"
) -> None:
    timeout = within
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- the service in this process --------------------------------------------------------


@dataclass
class Running:
    app: App
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def ingest(self) -> Ingest:
        return self.app.ingest

    @property
    def supervisor(self) -> Supervisor:
        return self.app.supervisor

    @property
    def runtime(self) -> MissionRuntime:
        return self.app.runtime


@asynccontextmanager
async def running_service(
    db: TestDatabase,
    settings: Settings | None = None,
    *,
    metrics: Metrics | None = None,
) -> AsyncIterator[Running]:
    settings = settings or settings_for(db)
    async with open_app(settings, dsn=db.dsn, metrics=metrics or Metrics()) as app:
        await prepare_database(app)
        stop = asyncio.Event()
        task = asyncio.create_task(app.supervisor.run(stop))
        try:
            async with asyncio.timeout(30):
                while not app.supervisor.streaming.is_set():
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.01)
            yield Running(app, stop, task)
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await task


@asynccontextmanager
async def running_full_service(
    db: TestDatabase,
    settings: Settings | None = None,
    *,
    metrics: Metrics | None = None,
) -> AsyncIterator[Running]:
    """Ingest, mission runtime, lag monitor and HTTP (on a free port), in this process."""
    from mission_runner.cli import serve

    settings = replace(settings or settings_for(db), http_port=0)
    async with open_app(settings, dsn=db.dsn, metrics=metrics or Metrics()) as app:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(app, stop))
        try:
            async with asyncio.timeout(30):
                while not app.runtime.accepting:
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.01)
            yield Running(app, stop, task)
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await task


# -- the service as a separate process --------------------------------------------------


class ServiceProcess:
    def __init__(self, db: TestDatabase, *args: str, **env: str) -> None:
        self.db = db
        self.args = args or ("run",)
        self.env = service_env(db, **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(f"/tmp/{db.name}-{uuid.uuid4().hex[:6]}.log")

    def start(self) -> ServiceProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mission_runner.cli", *self.args],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_streaming(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: bool((s := slot_row(self.db)) and s["active"]), timeout, "the service to stream"
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        wait_until(
            lambda: not ((s := slot_row(self.db)) and s["active"]), 30, "the slot to be released"
        )

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


@pytest.fixture
def service_processes() -> Iterator[list[ServiceProcess]]:
    procs: list[ServiceProcess] = []
    yield procs
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
