"""Leadership: a deposed instance writes nothing once another leads (the fencing token).

The single-active guard is an advisory lock on one connection; streaming, group commits and
write-backs use others. Ending only the lock's backend (what a NAT or proxy idle timeout
does to an idle connection) lets a waiting instance take over while the first one still
streams: everything the first one persists or confirms from then on must be refused, or
the new leader's snapshots miss it for good.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest

from tests.fix_data import (
    Change,
    agent,
    mission,
    persisted,
    recompute,
    stamp,
    write,
)
from tests.fix_pg import TestDatabase
from tests.fix_service import ServiceProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = 4
MISSIONS = 80


def _leader_backends(db: TestDatabase, instance: str) -> list[tuple[int, str | None]]:
    """(pid, wait_event_type) of the instance's leader-lock connections."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, wait_event_type FROM pg_stat_activity WHERE application_name = %s",
            (f"mission-runner leader {instance}",),
        ).fetchall()
    return [(int(pid), None if w is None else str(w)) for pid, w in rows]


def _holds_lock(db: TestDatabase, instance: str) -> bool:
    return any(w != "Lock" for _pid, w in _leader_backends(db, instance))


def _waits_for_lock(db: TestDatabase, instance: str) -> bool:
    return any(w == "Lock" for _pid, w in _leader_backends(db, instance))


def _streams(db: TestDatabase, instance: str) -> bool:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_activity a"
            " ON a.pid = s.active_pid WHERE s.slot_name = %s AND a.application_name = %s",
            (db.slot, f"mission-runner {instance}"),
        ).fetchone()
    return bool(row and row[0])


class Writers:
    """Users editing missions the way the web app does, until stopped: title edits, and
    `nextRunAt` moved to a new past instant (a new occurrence, due at once)."""

    def __init__(self, db: TestDatabase) -> None:
        self.db = db
        self.stop = threading.Event()
        self.written = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._rng = random.Random(7)

    def _change(self, n: int) -> Change:
        i = self._rng.randrange(MISSIONS)
        user, mission_id = f"u{i % USERS}", f"m{i}"
        at = f"2026-12-01T00:00:{n % 60:02d}.{n % 1000:03d}Z"
        if n % 5 == 0:
            fields = {"nextRunAt": f"2026-04-{1 + n % 14:02d}T00:00:00.{n % 1000:03d}Z"}
        else:
            fields = {"title": f"edit {n}"}
        return Change(
            user, "aiMissions", mission_id, "update", fields, {k: stamp(at) for k in fields}
        )

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            batch = [self._change(n + k) for k in range(3)]
            write(self.db, *batch)
            n += 3
            self.written += 1
            time.sleep(0.01)

    def __enter__(self) -> Writers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(30)


def _due_occurrences_are_planned_once(db: TestDatabase) -> bool:
    """Every active mission's current occurrence (all are in the past) is final, and no
    iteration id was appended twice."""
    with psycopg.connect(db.dsn) as conn:
        missing = conn.execute(
            "SELECT count(*) FROM mana_ai.mission_snapshots s WHERE NOT s.deleted"
            " AND s.record->>'state' = 'active' AND NOT EXISTS ("
            "  SELECT 1 FROM mana_ai.dispatch_ledger l WHERE l.user_id = s.user_id"
            "  AND l.mission_id = s.mission_id AND l.status IN ('written', 'failed')"
            "  AND l.occurrence = (s.record->>'nextRunAt')::timestamptz)"
        ).fetchone()
    return bool(missing) and missing[0] == 0


def _iteration_ids_appended(db: TestDatabase) -> list[str]:
    with psycopg.connect(db.dsn) as conn:
        rows = conn.execute(
            "SELECT data->'iterations'->-1->>'id' FROM sync_changes"
            " WHERE client_id = 'mana-ai-runner'"
        ).fetchall()
    return [str(r[0]) for r in rows]


def test_ending_only_the_lock_backend_loses_nothing(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    write(db, *(agent(f"a{u}", user=f"u{u}", maxConcurrentMissions=50) for u in range(USERS)))
    write(
        db,
        *(
            mission(f"m{i}", user=f"u{i % USERS}", agent_id=f"a{i % USERS}")
            for i in range(MISSIONS)
        ),
    )
    a = ServiceProcess(db, HOSTNAME="instance-a", HTTP_PORT="0").start()
    service_processes.append(a)
    wait_until(lambda: _streams(db, "instance-a"), 30, "A to stream")
    b = ServiceProcess(db, HOSTNAME="instance-b", HTTP_PORT="0").start()
    service_processes.append(b)
    wait_until(lambda: _waits_for_lock(db, "instance-b"), 30, "B to wait for the lock")

    with Writers(db) as writers:
        wait_until(lambda: writers.written >= 50, 30, "writes under way")
        # Only A's lock connection ends; A's stream, pool and process live on.
        (holder,) = [pid for pid, w in _leader_backends(db, "instance-a") if w != "Lock"]
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (holder,))
        wait_until(lambda: _streams(db, "instance-b"), 30, "B to take over the stream")
        wait_until(lambda: writers.written >= 400, 60, "writes after the take-over")
    # A went back to waiting; B leads.
    wait_until(lambda: _waits_for_lock(db, "instance-a"), 30, "A to wait for the lock again")
    assert _holds_lock(db, "instance-b")
    assert "waiting to lead again" in a.output()
    wait_until(lambda: _due_occurrences_are_planned_once(db), 60, "every occurrence planned")

    assert b.terminate() == 0, b.output()
    assert a.terminate() == 0, a.output()
    assert persisted(db) == recompute(db)
    ids = _iteration_ids_appended(db)
    assert len(ids) == len(set(ids)), "an occurrence was written twice"
