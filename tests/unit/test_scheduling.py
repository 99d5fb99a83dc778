"""Due rule, gates, token budget and the due index (pure, on a fake clock)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.clock import ManualClock
from core.instants import parse_stamp
from planner.budget import WINDOW_US, TokenBudget
from planner.due import Occurrence, occurrence_of
from planner.gates import LEGACY_AGENT_ID, GateDecision, decide
from planner.scheduler import DueIndex, Scheduler

NOW = parse_stamp("2026-04-15T12:00:00Z")
assert NOW is not None


def test_due_rule_cases_from_the_predecessor() -> None:
    due = occurrence_of(("u", "m"), {"state": "active", "nextRunAt": "2026-04-15T00:00:00Z"})
    assert due is not None and due.at_us <= NOW
    later = occurrence_of(("u", "m"), {"state": "active", "nextRunAt": "2099-01-01T00:00:00Z"})
    assert later is not None and later.at_us > NOW
    assert (
        occurrence_of(("u", "m"), {"state": "paused", "nextRunAt": "2026-04-15T00:00:00Z"}) is None
    )
    assert occurrence_of(("u", "m"), {"state": "active"}) is None
    assert occurrence_of(("u", "m"), {"state": "active", "nextRunAt": "soon"}) is None
    soft_deleted = {
        "state": "active",
        "nextRunAt": "2026-04-15T00:00:00Z",
        "deletedAt": "2026-04-15T01:00:00Z",
    }
    assert occurrence_of(("u", "m"), soft_deleted) is None


def test_occurrences_are_instants() -> None:
    a = occurrence_of(("u", "m"), {"state": "active", "nextRunAt": "2026-04-15T00:00:00Z"})
    b = occurrence_of(("u", "m"), {"state": "active", "nextRunAt": "2026-04-15T00:00:00.000Z"})
    c = occurrence_of(("u", "m"), {"state": "active", "nextRunAt": "2026-04-15T02:00:00+02:00"})
    assert a == b == c


AGENT = {
    "id": "a",
    "name": "Ada",
    "state": "active",
    "maxConcurrentMissions": 2,
    "maxTokensPerDay": 1000,
}
MISSION = {"agentId": "a", "state": "active"}


def test_gates_in_order() -> None:
    assert decide({"state": "active"}, None, in_flight=0, tokens_last_24h=0).agent_id == (
        LEGACY_AGENT_ID
    )
    missing = decide(MISSION, None, in_flight=99, tokens_last_24h=10**9)
    assert missing.runs and not missing.gated and missing.agent_name == "Mana"
    archived = decide(MISSION, {**AGENT, "state": "archived"}, in_flight=99, tokens_last_24h=10**9)
    assert archived.decision is GateDecision.SKIPPED_ARCHIVED
    paused = decide(MISSION, {**AGENT, "state": "paused"}, in_flight=99, tokens_last_24h=10**9)
    assert paused.decision is GateDecision.SKIPPED_PAUSED
    busy = decide(MISSION, AGENT, in_flight=2, tokens_last_24h=10**9)
    assert busy.decision is GateDecision.SKIPPED_CONCURRENCY
    broke = decide(MISSION, AGENT, in_flight=1, tokens_last_24h=1000)
    assert broke.decision is GateDecision.SKIPPED_BUDGET
    ok = decide(MISSION, AGENT, in_flight=1, tokens_last_24h=999)
    assert ok.decision is GateDecision.RAN and ok.gated and ok.agent_name == "Ada"


def test_budget_cap_zero_blocks_everything_and_negative_or_missing_does_not() -> None:
    assert (
        decide(MISSION, {**AGENT, "maxTokensPerDay": 0}, in_flight=0, tokens_last_24h=0).decision
        is GateDecision.SKIPPED_BUDGET
    )
    for cap in (None, -1, "100", True):
        agent = {**AGENT, "maxTokensPerDay": cap}
        assert decide(MISSION, agent, in_flight=0, tokens_last_24h=10**9).runs


def test_concurrency_default_is_one() -> None:
    agent = {k: v for k, v in AGENT.items() if k != "maxConcurrentMissions"}
    assert decide(MISSION, agent, in_flight=1, tokens_last_24h=0).decision is (
        GateDecision.SKIPPED_CONCURRENCY
    )
    assert (
        decide(
            MISSION, {**agent, "maxConcurrentMissions": 0}, in_flight=1, tokens_last_24h=0
        ).decision
        is GateDecision.SKIPPED_CONCURRENCY
    )


def test_rolling_token_window() -> None:
    budget = TokenBudget()
    key = ("u", "a")
    budget.add(key, 100, NOW)
    budget.add(key, 50, NOW + 3_600_000_000)
    budget.add(key, 0, NOW)  # ignored
    assert budget.used(key, NOW + 1) == 150
    assert budget.frees_at(key, NOW + 1) == NOW + WINDOW_US
    assert budget.used(key, NOW + WINDOW_US) == 50
    assert budget.used(key, NOW + WINDOW_US + 3_600_000_000) == 0
    assert budget.frees_at(key, NOW + 2 * WINDOW_US) is None


def test_budget_loads_out_of_order() -> None:
    budget = TokenBudget()
    budget.add(("u", "a"), 10, NOW + 10)
    budget.add(("u", "a"), 20, NOW)
    assert budget.frees_at(("u", "a"), NOW) == NOW + WINDOW_US
    assert budget.used(("u", "a"), NOW + WINDOW_US) == 10


def occ(mission: str, at: int) -> Occurrence:
    return Occurrence(at, ("u", mission))


def test_due_index_orders_replaces_and_discards() -> None:
    index = DueIndex()
    assert index.set(occ("a", 30))
    assert index.set(occ("b", 10))
    assert not index.set(occ("c", 20))
    index.set(occ("a", 5))  # moved sooner: the old entry is dead
    index.discard(("u", "c"))
    assert index.next_at() == 5
    assert [o.mission_id for o in index.pop_due(10)] == ["a", "b"]
    assert index.pop_due(100) == []
    assert len(index) == 0


def test_due_index_not_before() -> None:
    index = DueIndex()
    index.set(occ("a", 10), not_before=50)
    assert index.pop_due(49) == []
    assert [o.mission_id for o in index.pop_due(50)] == ["a"]


@given(
    st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 100)), max_size=60),
    st.integers(0, 100),
)
def test_due_index_pops_exactly_the_latest_due_entries(
    ops: list[tuple[str, int]], now: int
) -> None:
    index = DueIndex()
    latest: dict[str, int] = {}
    for mission, at in ops:
        index.set(occ(mission, at))
        latest[mission] = at
    popped = index.pop_due(now)
    assert sorted((o.mission_id, o.at_us) for o in popped) == sorted(
        (m, at) for m, at in latest.items() if at <= now
    )
    assert [o.at_us for o in popped] == sorted(o.at_us for o in popped)
    assert len(index) == sum(1 for at in latest.values() if at > now)


async def _settle(until: Callable[[], bool]) -> None:
    """Let the scheduler task run until `until()` holds (event-loop turns, no real time)."""
    for _ in range(1000):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("the scheduler did not get there")


async def test_scheduler_wakes_for_a_sooner_entry_inserted_while_it_sleeps() -> None:
    clock = ManualClock(now_us=NOW)
    handed: list[str] = []
    scheduler = Scheduler(clock=clock)
    stop = asyncio.Event()

    async def follow() -> None:
        while (due := await scheduler.next_due(stop)) is not None:
            handed.extend(o.mission_id for o in due)

    task = asyncio.create_task(follow())
    scheduler.set(occ("due", NOW))
    await _settle(lambda: clock.sleepers == 0)
    assert handed == []  # not enabled yet (the stream has not caught up)
    scheduler.enable()
    await _settle(lambda: handed == ["due"])
    scheduler.set(occ("later", NOW + 3_600_000_000))
    await _settle(lambda: clock.sleepers == 1)  # asleep on the clock, for an hour

    scheduler.set(occ("sooner", NOW + 10_000_000))  # while it sleeps
    await _settle(lambda: clock.sleepers == 1 and scheduler.index.next_at() == NOW + 10_000_000)
    clock.advance(9.9)
    await _settle(lambda: clock.sleepers == 1)
    assert handed == ["due"]  # not a moment early
    clock.advance(0.1)
    await _settle(lambda: handed == ["due", "sooner"] and clock.sleepers == 1)
    clock.advance(3590)
    await _settle(lambda: handed == ["due", "sooner", "later"])
    stop.set()
    await asyncio.wait_for(task, 1)


def test_manual_clock_does_not_go_back() -> None:
    clock = ManualClock(now_us=NOW)
    with pytest.raises(ValueError):
        clock.set_now_us(NOW - 1)
