"""The stream into snapshots against a real server: delivery, restarts, loads, dead letters."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from core.failpoints import FailPoints
from core.sync_changes import COLUMNS
from mission_runner.metrics import Metrics
from tests.fix_data import (
    Change,
    ai_row_count,
    awrite,
    bulk_missions,
    checkpoint,
    in_memory,
    mission_insert,
    persisted,
    recompute,
    slot_row,
    stamp,
    write,
)
from tests.fix_pg import TestDatabase
from tests.fix_service import eventually, running_service, settings_for

pytestmark = pytest.mark.integration


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def test_rows_from_other_connections_reach_memory_and_tables(db: TestDatabase) -> None:
    metrics = Metrics()
    async with running_service(db, metrics=metrics) as svc:
        await awrite(db, mission_insert("u1", "m1", title="first"))
        await awrite(
            db,
            Change(
                "u1", "agents", "a1", "insert", {"id": "a1", "name": "Ada", "state": "active"}, {}
            ),
            Change(
                "u1",
                "aiMissions",
                "m1",
                "update",
                {"title": "second"},
                {"title": stamp("2099-01-01T00:00:00.000Z")},
            ),
            Change("u2", "notes", "n1", "insert", {"id": "n1"}, {}, app_id="notes"),
        )
        ing = svc.ingest
        await eventually(
            lambda: (
                ing.missions.get("u1", "m1") is not None
                and ing.missions.get("u1", "m1").values.get("title") == "second"
            ),
            what="the update in memory",
        )
        assert ing.agents.get("u1", "a1") is not None
        await svc.supervisor.sync_point()
        assert persisted(db) == recompute(db) == in_memory(svc.app)
        assert sample(metrics, "mana_ai_stream_rows_total", table="aiMissions") == 2
        assert sample(metrics, "mana_ai_stream_rows_total", table="agents") == 1
        cp = checkpoint(db)
        slot = slot_row(db)
        assert cp is not None and slot is not None
        # The slot is never told more than was applied.
        assert psycopg_lsn(slot["confirmed_flush_lsn"]) <= ing.projector.applied_lsn


def psycopg_lsn(text: str):  # type: ignore[no-untyped-def]
    from core.lsn import Lsn

    return Lsn.parse(text)


async def test_other_apps_are_filtered_on_the_server(db: TestDatabase) -> None:
    if db.server.version_num < 150000:
        pytest.skip("row filters need PostgreSQL 15")
    metrics = Metrics()
    async with running_service(db, metrics=metrics) as svc:
        await awrite(
            db,
            *[
                Change("u", "notes", f"n{i}", "insert", {"x": i}, {}, app_id="notes")
                for i in range(50)
            ],
        )
        await awrite(db, mission_insert("u", "m1"))
        await svc.supervisor.sync_point()
        repl = svc.supervisor.replication
        assert repl is not None
    # The 50 notes rows never crossed the wire: only the mission row was received.
    assert sample(metrics, "mana_ai_stream_rows_total", table="aiMissions") == 1
    # And only the columns we read are sent (a column list), inserts only, filtered.
    with db.connect() as conn:
        row = conn.execute(
            "SELECT t.attnames, t.rowfilter, p.pubinsert, p.pubupdate, p.pubdelete"
            " FROM pg_publication_tables t JOIN pg_publication p ON p.pubname = t.pubname"
            " WHERE t.pubname = 'mission_runner'"
        ).fetchone()
    assert row is not None
    assert row[0] == list(COLUMNS)
    assert "app_id" in row[1] and row[2:] == (True, False, False)


async def test_restart_resumes_without_loss_or_double_apply(db: TestDatabase) -> None:
    write(db, mission_insert("u1", "m0"))
    async with running_service(db) as svc:
        await awrite(db, mission_insert("u1", "m1"))
        await svc.supervisor.sync_point()
        first = svc.ingest.rows_applied
    write(db, mission_insert("u1", "m2"), mission_insert("u2", "m3"))
    async with running_service(db) as svc:
        await svc.supervisor.sync_point()
        # Only the two rows committed while stopped were applied: no replay of history.
        assert svc.ingest.rows_applied == 2
        assert svc.ingest.transactions_applied >= 1
        assert len(svc.ingest.missions) == 4
    assert first + 2 == ai_row_count(db)
    assert persisted(db) == recompute(db)


async def test_first_start_loads_history_in_the_slot_snapshot_without_gap(
    db: TestDatabase,
) -> None:
    """History before the first start is loaded in the exported snapshot while writers keep
    committing; every row is applied exactly once (load or stream, never both). The writes
    land while the load holds its snapshot open (a hold point), so they are in the window."""
    history = bulk_missions(db, users=20, missions=3000, updates=12000)
    points = FailPoints()
    hold = points.hold("load-snapshot")
    metrics = Metrics()
    service = running_service(db, metrics=metrics, failpoints=points)
    entering = asyncio.ensure_future(service.__aenter__())
    await asyncio.wait_for(hold.reached.wait(), 30)
    async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
        for n in range(50):  # committed after the slot's consistent point, one by one
            await conn.execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                " field_meta, client_id) VALUES ('ai', 'aiMissions', %s, 'w', 'insert',"
                " jsonb_build_object('title', 'w'), '{}', 'w')",
                (f"w{n}",),
            )
    hold.release()
    svc = await asyncio.wait_for(entering, 60)
    try:
        await svc.supervisor.sync_point()
        # The load saw the history only; the 50 came through the stream.
        assert sample(metrics, "mana_ai_stream_rows_total", table="aiMissions") == history + 50
        assert svc.ingest.transactions_applied >= 50
        assert svc.ingest.rows_applied == ai_row_count(db) == history + 50
        assert in_memory(svc.app) == recompute(db)
    finally:
        await service.__aexit__(None, None, None)
    assert persisted(db) == recompute(db)


async def test_malformed_rows_go_to_dead_letter_and_the_stream_goes_on(db: TestDatabase) -> None:
    with db.connect() as conn:
        # Production tables are not always as strict as the dev schema.
        conn.execute("ALTER TABLE sync_changes DROP CONSTRAINT sync_changes_op_check")
    metrics = Metrics()
    async with running_service(db, metrics=metrics) as svc:
        await awrite(db, Change("u", "aiMissions", "bad1", "insert", [1, 2], {}))
        await awrite(db, Change("u", "aiMissions", "bad2", "upsert", {"a": 1}, {}))
        await awrite(db, Change("u", "aiMissions", "", "insert", {"a": 1}, {}))
        await awrite(db, Change("u", "aiMissions", "bad3", "update", None, {}))
        await awrite(
            db, Change("u", "aiMissions", "good", "insert", {"title": "ok"}, {"title": 12345})
        )
        await svc.supervisor.sync_point()
        assert svc.ingest.missions.get("u", "good") is not None
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT reason, lsn IS NOT NULL, raw->'columns'->>'record_id'"
            " FROM mana_ai.dead_letter ORDER BY id"
        ).fetchall()
    assert [r[0] for r in rows] == [
        "data-not-object",
        "unknown-op",
        "missing-ids",
        "data-not-object",
    ]
    assert all(r[1] for r in rows)
    assert rows[0][2] == "bad1"
    assert sample(metrics, "mana_ai_stream_dead_letters_total", reason="data-not-object") == 2
    assert sample(metrics, "mana_ai_invalid_field_stamps_total") == 1


async def test_delete_on_sync_changes_still_succeeds_with_the_publication(
    db: TestDatabase,
) -> None:
    async with running_service(db) as svc:
        await awrite(db, mission_insert("u", "m1"), mission_insert("u", "m2"))
        await svc.supervisor.sync_point()
        with db.connect() as conn:
            deleted = conn.execute("DELETE FROM sync_changes WHERE record_id = 'm1'").rowcount
            conn.execute("UPDATE sync_changes SET client_id = 'x' WHERE record_id = 'm2'")
        assert deleted == 1
        await svc.supervisor.sync_point()
        # Hard deletes by other services do not touch our snapshots.
        assert svc.ingest.missions.get("u", "m1") is not None


async def test_large_transaction_beyond_logical_decoding_work_mem(db: TestDatabase) -> None:
    settings = settings_for(db)
    metrics = Metrics()
    with db.connect() as conn:
        conn.execute(f"ALTER DATABASE {db.name} SET logical_decoding_work_mem = '64kB'")
    async with running_service(db, settings, metrics=metrics) as svc:
        rows = bulk_missions(db, users=5, missions=5000, updates=0, tx_size=5000)
        await svc.supervisor.sync_point()
        assert svc.ingest.rows_applied == rows == 5000
        assert len(svc.ingest.missions) == 5000
    assert persisted(db) == recompute(db)
