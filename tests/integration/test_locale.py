"""Errors are classified by SQLSTATE and by the slot's state, never by message text: the
same behaviour when the server answers in German (`lc_messages = 'de_DE.UTF-8'`).

Needs a server with translations and the locale on the machine (Debian's PostgreSQL 15 has
them; `.ci/run` generates the locale); skipped otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
from psycopg import conninfo

from core.clock import SystemClock
from mission_runner.metrics import Metrics
from stream.consumer import ReplicationConnection, StreamOptions
from stream.errors import ReplicationError, SlotLostError
from tests.fix_data import awrite, mission_insert, persisted, recompute, write
from tests.fix_pg import PgServer, TestDatabase
from tests.fix_service import ROOT, running_service, service_env

pytestmark = pytest.mark.integration

GERMAN = "de_DE.UTF-8"


@pytest.fixture
def german(controllable_server: PgServer) -> Iterator[PgServer]:
    controllable_server.set_config("lc_messages", GERMAN)
    try:
        with psycopg.connect(controllable_server.dsn(), autocommit=True) as conn:
            try:
                conn.execute("SELECT 1/0")
            except psycopg.errors.DivisionByZero as exc:
                message = str(exc)
        if "Division durch Null" not in message:
            pytest.skip(f"the server does not speak German here (got {message!r})")
        yield controllable_server
    finally:
        controllable_server.set_config("lc_messages", None)


class _Sink:
    def on_transaction(self, tx: object) -> bool:
        return True

    async def finish(self) -> None:
        return None

    def on_logical_message(self, msg: object) -> None:
        return None

    def on_keepalive(self, wal_end: object) -> bool:
        return False


async def test_a_missing_slot_is_recognised_in_german(db: TestDatabase, german: PgServer) -> None:
    async with running_service(db) as svc:
        supervisor = svc.supervisor
        repl = await ReplicationConnection.connect(db.dsn, clock=SystemClock())
        try:
            options = StreamOptions(slot="no_such_slot", publication="mission_runner")
            with pytest.raises(ReplicationError) as caught:
                await repl.stream(supervisor.ingest.applied_lsn, _Sink(), options)  # type: ignore[arg-type]
        finally:
            await repl.close()
        assert caught.value.sqlstate == "42704"
        assert "existiert nicht" in str(caught.value)  # the server's German
        # Resolved by reading the slot's state: ours exists (not lost), that one does not.
        assert type(await supervisor.resolve(caught.value)) is ReplicationError
        supervisor.options = replace(supervisor.options, slot="no_such_slot")
        assert isinstance(await supervisor.resolve(caught.value), SlotLostError)


async def test_a_dropped_slot_is_rebuilt_in_german(db: TestDatabase, german: PgServer) -> None:
    async with running_service(db) as svc:
        await awrite(db, mission_insert("u", "m1"))
        await svc.supervisor.sync_point()
    with db.connect() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (db.slot,))
    write(db, mission_insert("u", "m2"))
    metrics = Metrics()
    async with running_service(db, metrics=metrics) as svc:
        await svc.supervisor.sync_point()
        rebuilt = metrics.registry.get_sample_value(
            "mana_ai_stream_rebuilds_total", {"reason": "slot-missing"}
        )
        assert rebuilt == 1
    assert persisted(db) == recompute(db)


def test_a_wrong_database_name_fails_at_once_in_german(db: TestDatabase, german: PgServer) -> None:
    env = service_env(db, MISSION_RUNNER_CONNECT_RETRY="30s")
    env["DATABASE_URL"] = conninfo.make_conninfo(db.dsn, dbname="no_such_database")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mission_runner.cli", "catch-up"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "DATABASE_URL" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 15  # not retried like an unreachable server
