"""The leader lock: cancellation always propagates, a dead session is noticed, and a waiter
blocks on the server (no polling)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from core.backoff import Backoff
from stream.errors import LeadershipLost
from stream.leader import LeaderLock
from tests.fix_pg import TestDatabase
from tests.fix_service import eventually

pytestmark = pytest.mark.integration


def _lock(db: TestDatabase, instance: str) -> LeaderLock:
    return LeaderLock(conninfo=db.dsn, slot=db.slot, backoff=Backoff(0.05, 0.5), instance=instance)


def _backends(db: TestDatabase, instance: str) -> int:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (f"mission-runner leader {instance}",),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("stopping", [False, True])
async def test_cancelling_a_waiter_cancels_it(pg_db: TestDatabase, stopping: bool) -> None:
    holder, waiter = _lock(pg_db, "holder"), _lock(pg_db, "waiter")
    assert await holder.try_acquire()
    try:
        stop = asyncio.Event()
        task = asyncio.create_task(waiter.acquire(stop))
        await eventually(lambda: waiter.waiting_on is not None, what="the waiter to wait")
        await asyncio.sleep(0.1)
        if stopping:
            # Cancelled while it gives up on `stop`: still a cancellation, not "False".
            stop.set()
            for _ in range(3):  # into the wait for the cancelled query to end
                await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        await eventually(lambda: _backends(pg_db, "waiter") == 0, what="its connection closed")
        assert not waiter.held
    finally:
        await holder.release()


async def test_a_session_that_ended_is_noticed(pg_db: TestDatabase) -> None:
    lock = _lock(pg_db, "gone")
    assert await lock.try_acquire()
    await lock.check()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            ("mission-runner leader gone",),
        )
    with pytest.raises(LeadershipLost):
        await lock.check()
    await lock.release()


async def test_a_waiter_takes_over_when_the_holder_goes(pg_db: TestDatabase) -> None:
    holder, waiter = _lock(pg_db, "first"), _lock(pg_db, "second")
    assert await holder.try_acquire()
    assert not await waiter.try_acquire()
    task = asyncio.create_task(waiter.acquire(asyncio.Event()))
    await eventually(lambda: waiter.waiting_on is not None, what="the waiter to wait")
    await holder.release()
    assert await asyncio.wait_for(task, 10)
    await waiter.check()
    await waiter.release()
