"""Crashes, server restarts and lost slots: after each, snapshots equal a full recomputation
from `sync_changes`, and no row is applied twice."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import psycopg
import pytest

from core.lsn import Lsn
from mission_runner.metrics import Metrics
from stream.errors import LeadershipLost
from tests.fix_data import (
    ai_row_count,
    awrite,
    bulk_missions,
    checkpoint,
    mission_insert,
    persisted,
    recompute,
    slot_row,
    write,
)
from tests.fix_pg import PgServer, TestDatabase
from tests.fix_service import (
    ROOT,
    ServiceProcess,
    eventually,
    running_service,
    service_env,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration

_CAUGHT_UP = re.compile(r"(\d+) transactions and (\d+) rows applied")


def catch_up(db: TestDatabase, **env: str) -> tuple[int, int]:
    """Run `mission-runner catch-up`; returns (transactions, rows) it applied."""
    proc = subprocess.run(
        [sys.executable, "-m", "mission_runner.cli", "catch-up"],
        env=service_env(db, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    match = _CAUGHT_UP.search(proc.stdout)
    assert match is not None, proc.stdout
    return int(match.group(1)), int(match.group(2))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_sigkill_between_persisting_and_confirming(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    catch_up(db)  # slot, publication and a first checkpoint
    svc = ServiceProcess(db, MISSION_RUNNER_FAILPOINTS="after-persist=1").start()
    service_processes.append(svc)
    svc.wait_streaming()
    write(db, *[mission_insert("u1", f"m{i}") for i in range(20)])
    assert svc.wait(30) == -9, svc.output()
    wait_until(lambda: not (slot_row(db) or {}).get("active"), what="slot release")
    cp = checkpoint(db)
    slot = slot_row(db)
    assert cp is not None and slot is not None
    # The batch and its checkpoint committed; the slot was never told.
    assert Lsn.parse(slot["confirmed_flush_lsn"]) < cp
    assert len(persisted(db)["mission"]) == 20

    write(db, mission_insert("u2", "late"))
    _tx, rows = catch_up(db)
    assert rows == 1  # the persisted rows were not applied a second time
    assert persisted(db) == recompute(db)


def test_sigkill_before_applying_a_large_transaction(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    catch_up(db)
    svc = ServiceProcess(db, MISSION_RUNNER_FAILPOINTS="before-apply-large=1").start()
    service_processes.append(svc)
    svc.wait_streaming()
    rows = bulk_missions(db, users=7, missions=3000, updates=0, tx_size=3000)
    assert svc.wait(60) == -9, svc.output()
    _tx, applied = catch_up(db)
    assert applied == rows
    assert persisted(db) == recompute(db)


def test_sigkill_while_a_large_transaction_is_streamed(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    """With logical_decoding_work_mem at 64kB the server streams the open transaction to us
    in blocks; the process dies with blocks buffered, the transaction commits later."""
    with db.connect() as conn:
        conn.execute(f"ALTER DATABASE {db.name} SET logical_decoding_work_mem = '64kB'")
    catch_up(db)
    svc = ServiceProcess(db).start()
    service_processes.append(svc)
    svc.wait_streaming()
    with psycopg.connect(db.dsn) as big:
        for chunk in range(5):
            big.execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                " field_meta, client_id) SELECT 'ai', 'aiMissions', 'big' || i, 'u', 'insert',"
                " jsonb_build_object('title', repeat('x', 200)), '{}', 't'"
                " FROM generate_series(%s::int, %s::int) i",
                (chunk * 1000, chunk * 1000 + 999),
            )
        with psycopg.connect(db.dsn, autocommit=True) as probe:
            row = probe.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            written = row[0]
            # Decoding has passed the open transaction's rows: being larger than
            # logical_decoding_work_mem, they were streamed to the service in blocks.
            wait_until(
                lambda: bool(
                    (
                        r := probe.execute(
                            "SELECT s.sent_lsn >= %s::pg_lsn FROM pg_stat_replication s"
                            " JOIN pg_replication_slots p ON p.active_pid = s.pid"
                            " WHERE p.slot_name = %s",
                            (written, db.slot),
                        ).fetchone()
                    )
                    and r[0]
                ),
                what="the open transaction to be streamed",
            )
        svc.kill()
        big.commit()
    write(db, mission_insert("u", "after"))
    _tx, applied = catch_up(db)
    assert applied == 5001
    assert persisted(db) == recompute(db)


async def test_server_restart_while_streaming(
    db: TestDatabase, controllable_server: PgServer
) -> None:
    metrics = Metrics()
    async with running_service(db, metrics=metrics) as svc:
        await awrite(db, mission_insert("u", "before"))
        await svc.supervisor.sync_point()
        await asyncio.to_thread(controllable_server.restart, "fast")
        await awrite(db, mission_insert("u", "after"))
        async with asyncio.timeout(60):
            while True:
                try:
                    await svc.supervisor.sync_point()
                    break
                except psycopg.OperationalError:
                    await asyncio.sleep(0.1)
        assert sample(metrics, "mana_ai_stream_reconnects_total", error="connection") >= 1
        assert svc.ingest.rows_applied == 2
    assert persisted(db) == recompute(db)


async def test_an_immediate_server_restart_applies_nothing_twice(
    db: TestDatabase, controllable_server: PgServer
) -> None:
    """A crash-restart of the server may set the slot back (PostgreSQL saves
    confirmed_flush_lsn lazily); the new term streams from the checkpoint, nothing twice."""
    async with running_service(db) as svc:
        for i in range(10):
            await awrite(db, mission_insert("u", f"m{i}"))
        await svc.supervisor.sync_point()
        await asyncio.to_thread(controllable_server.restart, "immediate")
        await awrite(db, mission_insert("u", "after"))
        async with asyncio.timeout(60):
            while True:
                try:
                    await svc.supervisor.sync_point()
                    break
                except (psycopg.OperationalError, LeadershipLost):
                    await asyncio.sleep(0.1)
        assert svc.ingest.rows_applied == 11
    assert persisted(db) == recompute(db)


async def test_resent_transactions_are_skipped(db: TestDatabase) -> None:
    """The stream restarts from the persisted checkpoint: what was applied after it, but not
    yet persisted, comes again, and is skipped (counted), never applied twice."""
    metrics = Metrics()
    settings = settings_for(db, batch_max_delay=60.0, instance="svc")  # nothing persists soon
    async with running_service(db, settings, metrics=metrics) as svc:
        for i in range(10):
            await awrite(db, mission_insert("u", f"m{i}"))
        await svc.supervisor.sync_point(persisted=False)
        assert svc.ingest.persisted_lsn < svc.ingest.applied_lsn
        applied_rows = svc.ingest.rows_applied
        # Only the replication connection ends (the lock and the term stay).
        with db.connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'mission-runner svc'"
            )
        await eventually(
            lambda: sample(metrics, "mana_ai_stream_skipped_transactions_total") >= 11,
            what="the re-sent transactions skipped",
        )
        assert svc.supervisor.term is not None and svc.supervisor.term.epoch == 1
        await svc.supervisor.sync_point()
        assert svc.ingest.rows_applied == applied_rows  # nothing applied twice
        # The ten writes and the first sync point's marker, each once.
        assert sample(metrics, "mana_ai_stream_skipped_transactions_total") == 11
    assert persisted(db) == recompute(db)
    assert len(persisted(db)["mission"]) == 10


async def test_slot_dropped_while_stopped_is_rebuilt_without_gap(db: TestDatabase) -> None:
    async with running_service(db) as svc:
        await awrite(db, mission_insert("u", "m1"))
        await svc.supervisor.sync_point()
    with db.connect() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (db.slot,))
    write(db, mission_insert("u", "m2"), mission_insert("u", "m3"))
    metrics = Metrics()
    async with running_service(db, metrics=metrics) as svc:
        await awrite(db, mission_insert("u", "m4"))
        await svc.supervisor.sync_point()
        assert sample(metrics, "mana_ai_stream_rebuilds_total", reason="slot-missing") == 1
        assert len(svc.ingest.missions) == 4
    assert persisted(db) == recompute(db)


def _generate_wal(db: TestDatabase, megabytes: int) -> None:
    with db.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS junk (id bigserial, pad text)")
        for _ in range(max(1, megabytes // 4)):
            conn.execute(
                "INSERT INTO junk (pad) SELECT repeat(md5(i::text), 32)"
                " FROM generate_series(1, 2000) i"
            )
            conn.execute("DELETE FROM junk")
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")


async def test_invalidated_slot_is_rebuilt_once(
    db: TestDatabase, controllable_server: PgServer
) -> None:
    async with running_service(db) as svc:
        await awrite(db, mission_insert("u", "m1"))
        await svc.supervisor.sync_point()
    controllable_server.set_config("max_slot_wal_keep_size", "1MB")
    try:
        for _ in range(20):
            _generate_wal(db, 8)
            if (slot_row(db) or {}).get("wal_status") == "lost":
                break
        assert (slot_row(db) or {}).get("wal_status") == "lost"
        write(db, mission_insert("u", "m2"))
        metrics = Metrics()
        async with running_service(db, metrics=metrics) as svc:
            await awrite(db, mission_insert("u", "m3"))
            await svc.supervisor.sync_point()
            assert sample(metrics, "mana_ai_stream_rebuilds_total", reason="slot-invalidated") == 1
            assert len(svc.ingest.missions) == 3
        assert (slot_row(db) or {}).get("wal_status") != "lost"
    finally:
        controllable_server.set_config("max_slot_wal_keep_size", None)
    assert persisted(db) == recompute(db)


async def test_quiet_table_keeps_retained_wal_bounded(db: TestDatabase) -> None:
    """Other tables take writes, sync_changes stays quiet: the slot still moves forward."""
    with db.connect() as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (db.slot + "_idle",)
        )
    settings = settings_for(db, heartbeat_interval=0.2, status_interval=0.5)
    try:
        async with running_service(db, settings) as svc:
            await awrite(db, mission_insert("u", "m1"))
            await svc.supervisor.sync_point()
            for _ in range(6):
                await asyncio.to_thread(_generate_wal, db, 16)
                await asyncio.sleep(0.5)
            with db.connect() as conn:
                ours, idle = (
                    int(r[0])
                    for r in conn.execute(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
                        " FROM pg_replication_slots WHERE slot_name IN (%s, %s)"
                        " ORDER BY slot_name",
                        (db.slot, db.slot + "_idle"),
                    ).fetchall()
                )
        # An unconsumed slot keeps everything; ours keeps a small, bounded tail.
        assert idle > 60 * 2**20
        assert ours < idle / 4, (ours, idle)
    finally:
        with db.connect() as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (db.slot + "_idle",))


async def test_status_updates_survive_a_flood_with_a_short_sender_timeout(
    db: TestDatabase,
) -> None:
    with db.connect() as conn:
        conn.execute(f"ALTER DATABASE {db.name} SET wal_sender_timeout = '2s'")
    metrics = Metrics()
    settings = settings_for(db, status_interval=0.5)
    async with running_service(db, settings, metrics=metrics) as svc:
        rows = await asyncio.to_thread(
            bulk_missions, db, users=50, missions=20000, updates=40000, tx_size=500
        )
        await svc.supervisor.sync_point()
        assert svc.ingest.rows_applied == rows
        assert sample(metrics, "mana_ai_stream_reconnects_total", error="connection") == 0
    assert ai_row_count(db) == rows
