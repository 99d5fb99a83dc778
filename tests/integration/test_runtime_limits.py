"""The mission runtime under failure and load: failed dispatches back off and end in a
failed iteration, plans in flight are capped, the group commit keeps a connection of its
own, and dispatching stops the moment this instance loses the stream or the lock."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from mission_runner.metrics import Metrics
from tests.fix_data import awrite, hold_the_slot, iteration_rows, ledger_rows, mission, persisted
from tests.fix_llm import FakeLLM, Reply, Slow
from tests.fix_pg import TestDatabase
from tests.fix_service import Running, eventually, running_full_service, settings_for

pytestmark = pytest.mark.integration


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def _refuse_claims(db: TestDatabase) -> None:
    """Ledger writes made outside withUser fail with insufficient_privilege (as under a role
    whose policy admits only user-scoped writes): every claim fails, the write-back, which
    runs in withUser, does not."""
    with db.connect() as conn:
        conn.execute(
            "CREATE FUNCTION mana_ai.refuse_claim() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF coalesce(current_setting('app.current_user_id', true), '') = '' THEN"
            " RAISE EXCEPTION 'permission denied for table dispatch_ledger'"
            " USING ERRCODE = '42501'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_claim BEFORE INSERT OR UPDATE ON mana_ai.dispatch_ledger"
            " FOR EACH ROW EXECUTE FUNCTION mana_ai.refuse_claim()"
        )


async def test_failed_dispatches_back_off_and_end_in_a_failed_iteration(db: TestDatabase) -> None:
    metrics = Metrics()
    settings = settings_for(db, planner_max_attempts=3, planner_retry_base=0.2)
    async with running_full_service(db, settings, metrics=metrics) as svc:
        _refuse_claims(db)
        await awrite(db, mission("m1", agent_id=None))
        await eventually(lambda: len(iteration_rows(db)) == 1, what="the failed iteration")
        await svc.supervisor.sync_point()
        failures = sample(metrics, "mana_ai_dispatch_failures_total", kind="42501")
        # Three failed claims, spaced by the backoff, then the failed iteration: no more.
        assert failures == 3
        await asyncio.sleep(0.5)
        assert sample(metrics, "mana_ai_dispatch_failures_total", kind="42501") == 3
        # Spaced by the backoff (each retry waits at least half its nominal delay: 0.1 s,
        # then 0.2 s), not re-armed at once.
        starts = sorted(r.started_us for r in svc.runtime.recent if r.error)
        assert len(starts) == 3
        assert starts[1] - starts[0] >= 100_000 and starts[2] - starts[1] >= 200_000
    (row,) = iteration_rows(db)
    (iteration,) = row["data"]["iterations"]
    assert iteration["overallStatus"] == "failed"
    assert iteration["errorDetails"]["kind"] == "dispatch-failed"
    assert iteration["errorDetails"]["attempts"] == 3
    assert "permission denied" in iteration["errorDetails"]["message"]
    assert ledger_rows(db)["m1"][0] == "failed"


async def test_plans_in_flight_are_capped(db: TestDatabase, fake_llm: FakeLLM) -> None:
    fake_llm.default = Slow(0.3, Reply("done"))
    metrics = Metrics()
    settings = settings_for(
        db, planner_url=fake_llm.url, planner_retry_base=0.01, planner_concurrency=2
    )
    async with running_full_service(db, settings, metrics=metrics) as svc:
        waiting_seen = 0.0
        await awrite(db, *(mission(f"m{i}", agent_id=None) for i in range(8)))
        for _ in range(600):
            waiting_seen = max(waiting_seen, sample(metrics, "mana_ai_plans_waiting"))
            assert svc.runtime.in_flight <= 2
            if len(iteration_rows(db)) == 8:
                break
            await asyncio.sleep(0.02)
        assert len(iteration_rows(db)) == 8
    assert fake_llm.max_in_flight == 2
    assert waiting_seen >= 1


async def test_the_group_commit_keeps_a_connection_when_dispatches_hold_all_others(
    db: TestDatabase,
) -> None:
    async with running_full_service(db) as svc:
        pool = svc.app.pool
        held: list[Any] = []
        try:
            for _ in range(pool.max_size):
                held.append(await pool.getconn(timeout=10))
            await awrite(
                db, mission("while-busy", agent_id=None, next_run_at="2099-01-01T00:00:00Z")
            )
            await eventually(
                lambda: ("u1", "while-busy") in persisted(db)["mission"],
                what="the group commit while every pool connection is taken",
            )
        finally:
            for conn in held:
                await pool.putconn(conn)


def _terminate(db: TestDatabase, application_name: str) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )


async def _dispatches_again(svc: Running, db: TestDatabase, mission_id: str) -> None:
    await eventually(lambda: svc.runtime.accepting, what="dispatching again")
    await awrite(db, mission(mission_id, agent_id=None))
    await eventually(lambda: len(iteration_rows(db, mission_id)) == 1, what=f"{mission_id} planned")


async def test_losing_the_stream_pauses_dispatching_until_caught_up(db: TestDatabase) -> None:
    settings = settings_for(db, instance="svc")
    async with running_full_service(db, settings) as svc:
        _terminate(db, "mission-runner svc")  # our walsender
        holder = await hold_the_slot(db)
        try:
            await eventually(lambda: not svc.runtime.accepting, what="dispatching paused")
            await awrite(db, mission("during", agent_id=None))
            await asyncio.sleep(0.5)
            assert iteration_rows(db) == []  # no stream, no judgement
        finally:
            await holder.close()
        await eventually(lambda: len(iteration_rows(db, "during")) == 1, what="planned after")
        assert svc.supervisor.term is not None and svc.supervisor.term.epoch == 1  # same term
        await _dispatches_again(svc, db, "after")


async def test_losing_the_lock_stops_dispatching_and_a_new_term_reloads(db: TestDatabase) -> None:
    settings = settings_for(db, instance="svc")
    key = "SELECT pg_advisory_lock(hashtextextended('mission_runner:' || %s, 0))"
    async with running_full_service(db, settings) as svc:
        await awrite(db, mission("before", agent_id=None))
        await eventually(lambda: len(iteration_rows(db, "before")) == 1, what="planned before")
        # Another instance waits for the lock; the service's lock session ends.
        other = await psycopg.AsyncConnection.connect(db.dsn, autocommit=True)
        waiting = asyncio.ensure_future(other.execute(key, (db.slot,)))
        await asyncio.sleep(0.2)
        _terminate(db, "mission-runner leader svc")
        await asyncio.wait_for(waiting, 20)  # the other one leads now
        try:
            await eventually(lambda: not svc.runtime.accepting, what="dispatching stopped")
            await awrite(db, mission("while-deposed", agent_id=None))
            await asyncio.sleep(0.5)
            assert iteration_rows(db, "while-deposed") == []
        finally:
            await other.close()  # the other one goes away: the service leads again
        await eventually(
            lambda: svc.supervisor.term is not None and svc.supervisor.term.epoch == 2,
            what="a new term",
        )
        await eventually(lambda: len(iteration_rows(db, "while-deposed")) == 1, what="planned")
        await _dispatches_again(svc, db, "after")
    # The occurrence planned in the first term is not planned again in the second.
    assert len(iteration_rows(db, "before")) == 1
    assert ledger_rows(db)["before"] == ("written", 1)
