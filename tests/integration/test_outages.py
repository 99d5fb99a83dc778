"""Database outages and failures: the service rides out a restart of the server (fast and
immediate alike) without exiting, stops within 10 s on SIGTERM while the server is down, and
stops with a clear error when a write will never succeed."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from core.lsn import Lsn
from tests.fix_data import mission_insert, persisted, recompute, write
from tests.fix_pg import PgServer, TestDatabase
from tests.fix_service import ServiceProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as res:
            return res.status, json.loads(res.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def _ready(port: int) -> bool:
    return get(port, "/readyz")[0] == 200


def _applied(port: int) -> int:
    status, body = get(port, "/api/status")
    totals = body.get("totals") if status == 200 else None
    return int(totals["rows"]) if isinstance(totals, dict) else -1


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_the_service_rides_out_a_database_outage(
    db: TestDatabase,
    controllable_server: PgServer,
    service_processes: list[ServiceProcess],
    mode: str,
) -> None:
    port = free_port()
    svc = ServiceProcess(db, HTTP_PORT=str(port)).start()
    service_processes.append(svc)
    wait_until(lambda: _ready(port), 30, "ready")
    write(db, mission_insert("u", "before"))
    wait_until(lambda: ("u", "before") in persisted(db)["mission"], 20, "the first row")

    controllable_server.stop(mode)
    try:
        # Down for longer than any single retry: the service stays up and says why.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert svc.proc is not None and svc.proc.poll() is None, svc.output()
            time.sleep(0.2)
        status, body = get(port, "/readyz")
        assert status == 503 and body["ready"] is False, body
        assert get(port, "/healthz")[0] == 200
    finally:
        controllable_server.start()

    # Back: it takes the lock again and resumes from its checkpoint by itself.
    wait_until(lambda: _ready(port), 60, "ready again after the outage")
    write(db, mission_insert("u", "after"))
    wait_until(lambda: ("u", "after") in persisted(db)["mission"], 30, "a row after the outage")
    assert svc.terminate() == 0, svc.output()
    assert persisted(db) == recompute(db)
    assert "Traceback" not in svc.output()


def test_sigterm_while_the_database_is_down_exits_within_10_s(
    db: TestDatabase, controllable_server: PgServer, service_processes: list[ServiceProcess]
) -> None:
    port = free_port()
    # A long group-commit delay keeps applied changes unpersisted when the server goes away.
    svc = ServiceProcess(db, HTTP_PORT=str(port), MISSION_RUNNER_BATCH_MAX_DELAY="60s").start()
    service_processes.append(svc)
    wait_until(lambda: _ready(port), 30, "ready")
    write(db, mission_insert("u", "pending"))
    wait_until(lambda: _applied(port) >= 1, 20, "the row applied in memory")
    with psycopg.connect(db.dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (db.slot,),
        ).fetchone()
    assert row is not None
    confirmed_before = row[0]
    controllable_server.stop("immediate")
    try:
        assert svc.proc is not None
        started = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(20)
        elapsed = time.monotonic() - started
    finally:
        controllable_server.start()
    assert code == 0, svc.output()
    assert elapsed < 10, f"took {elapsed:.1f} s\n{svc.output()}"
    # Nothing confirmed that is not persisted: the row is not in the snapshots, and the slot
    # still has it (a restart applies it).
    assert ("u", "pending") not in persisted(db)["mission"]
    with psycopg.connect(db.dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (db.slot,),
        ).fetchone()
    # (A crash restart may even set the slot back: PostgreSQL saves its position lazily.)
    assert row is not None and Lsn.parse(str(row[0])) <= Lsn.parse(str(confirmed_before))
    again = ServiceProcess(db, HTTP_PORT=str(port)).start()
    service_processes.append(again)
    wait_until(lambda: ("u", "pending") in persisted(db)["mission"], 30, "the row after restart")
    assert again.terminate() == 0, again.output()


def test_a_write_that_can_never_succeed_stops_the_service_with_a_clear_error(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    svc = ServiceProcess(db, HTTP_PORT="0").start()
    service_processes.append(svc)
    svc.wait_streaming()
    # What a revoked privilege looks like to the service: SQLSTATE 42501.
    _refuse_snapshot_writes(db, "42501", "permission denied for table mission_snapshots")
    write(db, mission_insert("u", "refused"))
    assert svc.wait(30) == 1, svc.output()
    out = svc.output()
    assert ("will not succeed by retrying" in out and "42501" in out) or "permission denied" in out
    assert "Traceback" not in out
    assert out.count("persisting snapshots failed") <= 2, "it retried a non-transient error"


def _refuse_snapshot_writes(db: TestDatabase, sqlstate: str, message: str) -> None:
    """Make every write of a mission snapshot fail with `sqlstate` (tests run as a superuser,
    whom privileges do not bind, so a trigger stands in for the server refusing)."""
    with db.connect() as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION mana_ai.refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = '{sqlstate}'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON mana_ai.mission_snapshots"
            " FOR EACH ROW EXECUTE FUNCTION mana_ai.refuse()"
        )


def test_sigterm_while_a_group_commit_keeps_failing_exits_within_10_s(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    port = free_port()
    svc = ServiceProcess(db, HTTP_PORT=str(port)).start()
    service_processes.append(svc)
    wait_until(lambda: _ready(port), 30, "ready")
    # A transient error (serialization failure): retried with backoff, indefinitely.
    _refuse_snapshot_writes(db, "40001", "could not serialize access")
    write(db, mission_insert("u", "stuck"))
    wait_until(lambda: svc.output().count("persisting snapshots failed") >= 2, 20, "retries")
    assert svc.proc is not None
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    code = svc.proc.wait(20)
    elapsed = time.monotonic() - started
    assert code == 0, svc.output()
    assert elapsed < 10, f"took {elapsed:.1f} s\n{svc.output()}"
    with db.connect() as conn:
        conn.execute("DROP TRIGGER refuse ON mana_ai.mission_snapshots")
    assert ("u", "stuck") not in persisted(db)["mission"]
    again = ServiceProcess(db, HTTP_PORT=str(port)).start()
    service_processes.append(again)
    wait_until(lambda: ("u", "stuck") in persisted(db)["mission"], 30, "the row after restart")
    assert again.terminate() == 0, again.output()
    assert persisted(db) == recompute(db)
