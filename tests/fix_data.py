"""Test helpers for data in a real database: writing `sync_changes` rows the way the sync
service does, reading back what the service wrote, and a full recomputation of the
snapshots from the table to compare with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from core.instants import parse_stamp
from core.lsn import Lsn
from core.sync_changes import CLIENT_ID, COLUMNS
from projections.merge import to_record
from projections.projector import Outcome, Projector
from projections.stores import SnapshotStore
from tests.fix_pg import TestDatabase

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


def in_memory(app: Any) -> Snapshot:
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


# -- missions and agents as the web app writes them ---------------------------------------

PAST = "2026-04-15T00:00:00.000Z"
PAST_US = parse_stamp(PAST)
assert PAST_US is not None


def agent(agent_id: str, user: str = "u1", **fields: Any) -> Change:
    data = {
        "id": agent_id,
        "name": f"Agent {agent_id}",
        "role": "Plans carefully.",
        "state": "active",
        "maxConcurrentMissions": 1,
        "policy": {"tools": {}, "defaultsByModule": {}},
        **fields,
    }
    return Change(user, "agents", agent_id, "insert", data, {})


def agent_update(agent_id: str, user: str = "u1", **fields: Any) -> Change:
    meta = {k: stamp("2099-01-01T00:00:00.000Z") for k in fields}
    return Change(user, "agents", agent_id, "update", fields, meta)


def mission(
    mission_id: str,
    *,
    agent_id: str | None = "a1",
    user: str = "u1",
    next_run_at: str = PAST,
    **fields: Any,
) -> Change:
    data: dict[str, Any] = {
        "id": mission_id,
        "title": f"Mission {mission_id}",
        "conceptMarkdown": "Plan my day",
        "objective": "Get the garden ready",
        "inputs": [],
        "cadence": {"kind": "manual"},
        "state": "active",
        "nextRunAt": next_run_at,
        "iterations": [],
        **fields,
    }
    if agent_id is not None:
        data["agentId"] = agent_id
    return Change(user, "aiMissions", mission_id, "insert", data, {})


def iteration_rows(db: TestDatabase, mission_id: str | None = None) -> list[dict[str, Any]]:
    query = (
        "SELECT record_id, user_id, op, data, field_meta, client_id, origin, actor,"
        " schema_version, app_id, table_name FROM sync_changes WHERE client_id = %s"
    )
    params: tuple[str, ...] = (CLIENT_ID,)
    if mission_id is not None:
        query += " AND record_id = %s"
        params = (CLIENT_ID, mission_id)
    with psycopg.connect(db.dsn) as conn:
        cur = conn.execute(query + " ORDER BY created_at", params)
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def ledger_rows(db: TestDatabase) -> dict[str, tuple[str, int]]:
    with psycopg.connect(db.dsn) as conn:
        return {
            str(m): (str(s), int(a))
            for m, s, a in conn.execute(
                "SELECT mission_id, status, attempts FROM mana_ai.dispatch_ledger"
            )
        }


async def hold_the_slot(db: TestDatabase) -> psycopg.AsyncConnection[Any]:
    """Another consumer streaming the slot (close it to let go): the service cannot."""
    conn = await psycopg.AsyncConnection.connect(db.dsn, autocommit=True, replication="database")
    start = (
        f'START_REPLICATION SLOT "{db.slot}" LOGICAL 0/0'
        " (proto_version '1', publication_names '\"mission_runner\"')"
    )
    conn.pgconn.send_query(start.encode())
    return conn
