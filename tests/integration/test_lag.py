"""Lag in seconds and readiness against a real server: a restart behind the stream is not
"0 s behind", a quiet server reads 0 within seconds of streaming, and a stream that stays
silent while the server's WAL grows makes the instance not ready."""

from __future__ import annotations

import asyncio
import os
import signal

import psycopg
import pytest

from tests.fix_data import awrite, hold_the_slot, mission_insert
from tests.fix_pg import TestDatabase
from tests.fix_service import eventually, running_full_service, running_service, settings_for

pytestmark = pytest.mark.integration


async def test_a_restart_behind_the_stream_reads_hours_then_zero_soon(db: TestDatabase) -> None:
    async with running_service(db) as svc:
        await awrite(db, mission_insert("u", "m1"))
        await svc.supervisor.sync_point()
    # The last transaction applied before the stop committed two hours ago, and nobody else
    # streams the slot meanwhile, which keeps this instance from catching up at first.
    with db.connect() as conn:
        conn.execute(
            "UPDATE mana_ai.stream_checkpoint SET commit_time = now() - interval '2 hours'"
        )
    holder = await hold_the_slot(db)
    settings = settings_for(db, ready_max_lag=60)
    try:
        async with running_full_service(
            db, settings, until=lambda app: app.supervisor.term is not None
        ) as svc:
            lag = svc.app.monitor.lag_seconds()
            assert lag is not None and lag >= 7000, lag
            assert svc.app.status is not None
            ready, why = svc.app.status.ready()
            assert not ready, why
            await holder.close()
            # Nothing was committed meanwhile: as soon as the stream has confirmed the
            # server's position (sampled at start), the lag is 0 and the instance ready.
            await eventually(lambda: svc.app.monitor.lag_seconds() == 0, what="lag 0")
            await eventually(lambda: svc.app.status is not None and svc.app.status.ready()[0])
    finally:
        await holder.close()


def _walsender_pid(db: TestDatabase) -> int:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (db.slot,)
        ).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


async def test_a_silent_stream_while_the_wal_grows_is_not_ready(db: TestDatabase) -> None:
    if os.geteuid() != 0:
        pytest.skip("pausing the server's walsender needs root")
    settings = settings_for(db, ready_max_silence=1.0)
    async with running_full_service(db, settings) as svc:
        monitor, status = svc.app.monitor, svc.app.status
        assert status is not None
        await monitor.sample()
        await eventually(lambda: status.ready()[0], what="ready")
        pid = _walsender_pid(db)
        os.kill(pid, signal.SIGSTOP)  # the server stops sending; the connection stays up
        try:
            await awrite(db, mission_insert("u", "unsent"))
            await monitor.sample()  # the server's WAL is past what we received
            await asyncio.sleep(1.5)
            ready, why = status.ready()
            assert not ready and "silent" in why, why
        finally:
            os.kill(pid, signal.SIGCONT)
        await eventually(lambda: svc.ingest.missions.get("u", "unsent") is not None)
        await monitor.sample()
        await eventually(lambda: status.ready()[0], what="ready again")
