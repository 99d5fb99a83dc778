"""The mission runtime: due missions from the snapshots, through the gates, to the planner,
and their iterations back into `sync_changes`, exactly once per occurrence.

It follows the snapshots through the change feed (the ingest publishes what each applied
transaction changed; the runtime re-indexes those missions), keeps a due index, and hands
due occurrences that pass the gates to dispatch tasks (`planner.dispatch`).

Invariants:
- Nothing here queries `sync_changes` to find due missions: the index is fed by the stream.
- It dispatches only while this instance leads, holds the stream and has caught up in the
  current term (`planner.terms`), so a mission is never judged on a snapshot older than the
  log; and every judgement reads the latest applied snapshot. When the term ends (the lock
  is lost) it stops at once, cancels its dispatches (their writes are fenced anyway) and
  reloads everything when the next term begins.
- At most `concurrency` plans are in flight; more due missions wait, oldest first.
- A dispatch that fails outside the planner is retried with backoff, counted, and after
  `max_attempts` failures ends in the failed iteration (`Dispatcher.give_up`).
- Shutdown stops taking work, lets in-flight dispatches finish within a grace period and
  cancels the rest: a cancelled write-back transaction rolls back, leaving the occurrence
  `planning`, to be planned again after restart. Nothing is half-written.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool

from core.aio import sleep_or_stop, wait_first
from core.backoff import Backoff
from core.clock import Clock
from core.json_types import JsonValue
from planner.budget import AgentKey, TokenBudget
from planner.dispatch import Dispatcher, DispatchRecord
from planner.due import MissionKey, Occurrence, occurrence_of
from planner.feed import ChangeFeed
from planner.gates import LEGACY_AGENT_ID, GateDecision, GateResult, decide
from planner.metrics import RuntimeMetrics
from planner.scheduler import Scheduler
from planner.snapshots import Snapshots
from planner.terms import Term, Terms
from writer import ledger, usage
from writer.errors import FencedError

log = logging.getLogger(__name__)
tracer = trace.get_tracer("planner.runtime")

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]]

PRUNE_EVERY = 3600.0


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    max_attempts: int = 3
    """Planner attempts per occurrence, and failed dispatches before giving up."""
    retry: Backoff = field(default_factory=lambda: Backoff(1.0, 60.0))
    """Between planner attempts and failed dispatches."""
    concurrency: int = 64
    """Plans in flight at most, over all agents."""
    ledger_keep_days: int = 30
    shutdown_grace: float = 6.0


@dataclass(slots=True)
class _Agent:
    in_flight: int = 0
    deferred: deque[Occurrence] = field(default_factory=deque)
    parked: set[MissionKey] = field(default_factory=set)


@dataclass(slots=True)
class _Failures:
    """Failed dispatches of one occurrence, and when it may be tried again."""

    at_us: int
    count: int
    retry_at_us: int
    last_error: str


class MissionRuntime:
    def __init__(
        self,
        *,
        snapshots: Snapshots,
        feed: ChangeFeed,
        terms: Terms,
        dispatcher: Dispatcher,
        pool: Pool,
        clock: Clock,
        metrics: RuntimeMetrics,
        options: RuntimeOptions,
    ) -> None:
        self.snapshots = snapshots
        self.feed = feed
        self.terms = terms
        self.dispatcher = dispatcher
        self.pool = pool
        self.clock = clock
        self.metrics = metrics
        self.options = options
        self.scheduler = Scheduler(clock=clock)
        self.budget = TokenBudget()
        self.recent: deque[DispatchRecord] = deque(maxlen=50)
        self._term: Term | None = None  # the term whose state is loaded
        self._done: dict[MissionKey, int] = {}
        self._agents: dict[AgentKey, _Agent] = {}
        self._in_flight: dict[MissionKey, Occurrence] = {}
        self._waiting: deque[Occurrence] = deque()
        self._waiting_keys: set[MissionKey] = set()
        self._failures: dict[MissionKey, _Failures] = {}
        # The ingest batch that last (re)scheduled each mission: the dispatch span links to it.
        self._scheduled_by: dict[MissionKey, trace.SpanContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- state ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def accepting(self) -> bool:
        """True while due missions are dispatched (leading, streaming, caught up)."""
        return self.scheduler.enabled

    @property
    def planner_name(self) -> str:
        return self.dispatcher.planner.name

    def _agent(self, key: AgentKey) -> _Agent:
        agent = self._agents.get(key)
        if agent is None:
            agent = self._agents[key] = _Agent()
        return agent

    def _current_occurrence(self, key: MissionKey) -> Occurrence | None:
        values = self.snapshots.mission(key)
        return None if values is None else occurrence_of(key, values)

    def _reindex(self, key: MissionKey, batch: trace.SpanContext | None = None) -> None:
        occ = self._current_occurrence(key)
        if occ is None or self._done.get(key) == occ.at_us or key in self._in_flight:
            self.scheduler.discard(key)
            self._scheduled_by.pop(key, None)
            return
        failures = self._failures.get(key)
        not_before = None
        if failures is not None:
            if failures.at_us == occ.at_us:
                not_before = failures.retry_at_us
            else:
                del self._failures[key]  # a new occurrence starts with a clean slate
        self.scheduler.set(occ, not_before=not_before)
        if batch is not None:
            self._scheduled_by[key] = batch

    # -- terms --------------------------------------------------------------------------

    async def _load(self, term: Term) -> None:
        """The ledger's finished occurrences and the token window; then index every mission.
        Retried until it succeeds or the term ends (a database outage ends the term)."""
        attempt = 0
        while True:
            try:
                async with self.pool.connection() as conn:
                    done = await ledger.load_latest_final(conn)
                    windows = await usage.load_window(conn)
                break
            except psycopg.Error as exc:
                attempt += 1
                log.warning("loading the dispatch ledger failed (%s); retrying", exc)
                if await sleep_or_stop(term.ended, self.options.retry.delay(attempt)):
                    return
        # Synchronous from here: no change can slip between the reset and the re-index.
        self._reset()
        for entry in done:
            self._done[(entry.user_id, entry.mission_id)] = entry.occurrence_us
        for u in windows:
            self.budget.add((u.user_id, u.agent_id), u.tokens, u.ts_us)
        self.feed.take_nowait()  # covered by the full re-index below
        for key in self.snapshots.mission_keys():
            self._reindex(key)
        self._term = term
        self.metrics.due_queue.set(len(self.scheduler.index))
        log.info(
            "mission runtime loaded (epoch %d): %d missions scheduled, %d finished occurrences",
            term.epoch,
            len(self.scheduler.index),
            len(self._done),
        )

    def _reset(self) -> None:
        self.scheduler.disable()
        self.scheduler.clear()
        self.budget = TokenBudget()
        self._done.clear()
        self._agents.clear()
        self._in_flight.clear()
        self._waiting.clear()
        self._waiting_keys.clear()
        self._failures.clear()
        self._scheduled_by.clear()
        self.metrics.in_flight.set(0)
        self.metrics.waiting.set(0)

    async def _serve_term(self, term: Term, stop: asyncio.Event) -> None:
        """Dispatch while the term lets us; return when it ends or `stop` is set."""
        await self._load(term)
        while not term.ended.is_set() and not stop.is_set():
            if term.dispatching and not self.scheduler.enabled:
                self.scheduler.enable()
                log.info("stream caught up (epoch %d): dispatching due missions", term.epoch)
            elif not term.dispatching and self.scheduler.enabled:
                self.scheduler.disable()
                log.warning("stream lost (epoch %d): dispatching paused", term.epoch)
            await wait_first(stop, term.ended, term.changed)
            term.changed.clear()
        self.scheduler.disable()
        if term.ended.is_set() and not stop.is_set():
            log.warning("leadership lost (epoch %d): dispatches stopped", term.epoch)
            await self._cancel_dispatches()

    async def _cancel_dispatches(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_feed(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            changes = await self.feed.take()
            if self._term is None or self._term.ended.is_set():
                continue  # the next load re-indexes everything
            for key, batch in changes.missions.items():
                self._reindex(key, batch)
            for agent_key in changes.agents:
                agent = self._agents.get(agent_key)
                if agent is not None and agent.parked:
                    parked, agent.parked = agent.parked, set()
                    for key in parked:
                        self._reindex(key)
            self.metrics.due_queue.set(len(self.scheduler.index))

    # -- decisions --------------------------------------------------------------------

    async def _follow_schedule(self, stop: asyncio.Event) -> None:
        while True:
            # Never judge on half a transaction (see ChangeFeed.settled).
            if await wait_first(stop, self.feed.settled) is stop:
                return
            due = await self.scheduler.next_due(stop)
            if due is None:
                return
            self._on_due(due)

    def _on_due(self, due: list[Occurrence]) -> None:
        if not self.feed.settled.is_set():
            # A large transaction is half applied: judge once it is whole (the feed then
            # brings its changes, which re-index these missions).
            for occ in due:
                self._reindex(occ.key)
            return
        for occ in due:
            self._evaluate(occ)

    def _evaluate(self, occ: Occurrence) -> None:
        term = self._term
        if term is None or not term.dispatching or self._stopping:
            return
        key = occ.key
        if self._current_occurrence(key) != occ or self._done.get(key) == occ.at_us:
            return  # changed since it was indexed; _reindex already rescheduled it
        if key in self._in_flight:
            return
        if len(self._in_flight) >= self.options.concurrency:
            if key not in self._waiting_keys:
                self._waiting_keys.add(key)
                self._waiting.append(occ)
                self.metrics.waiting.set(len(self._waiting))
            return
        values = self.snapshots.mission(key)
        assert values is not None
        agent_id = values.get("agentId")
        agent = None
        if isinstance(agent_id, str) and agent_id:
            agent = self.snapshots.agent(key[0], agent_id)
        agent_key: AgentKey = (key[0], agent_id) if isinstance(agent_id, str) else (key[0], "")
        slot = self._agent(agent_key)
        now = self.clock.now_us()
        used = self.budget.used(agent_key, now)
        gate = decide(values, agent, in_flight=slot.in_flight, tokens_last_24h=used)
        if gate.gated:
            self.metrics.agent_decisions.labels(gate.decision.value).inc()
        match gate.decision:
            case GateDecision.RAN:
                runs_as = agent_key if gate.gated else (key[0], LEGACY_AGENT_ID)
                self._start(occ, gate, runs_as, agent, term)
            case GateDecision.SKIPPED_CONCURRENCY:
                slot.deferred.append(occ)
            case GateDecision.SKIPPED_BUDGET:
                slot.parked.add(key)
                frees = self.budget.frees_at(agent_key, now)
                if frees is not None:
                    self.scheduler.set(occ, not_before=frees)
            case _:
                slot.parked.add(key)  # paused or archived: re-checked when the agent changes

    def _start(
        self,
        occ: Occurrence,
        gate: GateResult,
        agent_key: AgentKey,
        agent: Mapping[str, JsonValue] | None,
        term: Term,
    ) -> None:
        self._in_flight[occ.key] = occ
        self._agent(agent_key).in_flight += 1
        self.metrics.in_flight.set(len(self._in_flight))
        task = asyncio.create_task(
            self._dispatch(occ, gate, agent_key, agent, term), name=f"dispatch {occ.mission_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, occ: Occurrence, agent_key: AgentKey, term: Term) -> None:
        if self._term is not term:
            return  # the state was reset for a new term
        self._in_flight.pop(occ.key, None)
        self.metrics.in_flight.set(len(self._in_flight))
        slot = self._agent(agent_key)
        slot.in_flight = max(0, slot.in_flight - 1)
        self._reindex(occ.key)
        # One place freed: deferred missions of this agent go through the gates again,
        # oldest first, until one of them takes it (or has to wait again); then missions
        # waiting for a place under the global cap.
        while slot.deferred:
            waiting = slot.deferred.popleft()
            before = slot.in_flight
            self._evaluate(waiting)
            if slot.in_flight > before:
                break
            if slot.deferred and slot.deferred[-1] is waiting:
                slot.deferred.rotate(1)  # still at the limit: back to the front, in order
                break
        while self._waiting and len(self._in_flight) < self.options.concurrency:
            waiting = self._waiting.popleft()
            self._waiting_keys.discard(waiting.key)
            self._evaluate(waiting)
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.due_queue.set(len(self.scheduler.index))

    # -- one dispatch -----------------------------------------------------------------

    async def _dispatch(
        self,
        occ: Occurrence,
        gate: GateResult,
        agent_key: AgentKey,
        agent: Mapping[str, JsonValue] | None,
        term: Term,
    ) -> None:
        record = DispatchRecord(
            occ.user_id, occ.mission_id, occ.at_us, gate.agent_id, "error", self.clock.now_us(), 0
        )
        failures = self._failures.get(occ.key)
        giving_up = failures is not None and failures.count >= self.options.max_attempts
        span = tracer.start_span(
            "mission.dispatch",
            links=[trace.Link(b)] if (b := self._scheduled_by.pop(occ.key, None)) else None,
            attributes={
                "mission_runner.mission_id": occ.mission_id,
                "mission_runner.user_id": occ.user_id,
                "mission_runner.agent_id": gate.agent_id,
                "mission_runner.occurrence": occ.at_iso,
                "mission_runner.gate.decision": gate.decision.value,
                "mission_runner.gate.gated": gate.gated,
                "mission_runner.planner": self.planner_name,
                "mission_runner.epoch": term.epoch,
            },
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                if giving_up:
                    assert failures is not None
                    record.outcome = await self.dispatcher.give_up(
                        occ, gate, term.fence, failures.last_error, failures.count
                    )
                else:
                    record.outcome = await self.dispatcher.dispatch(
                        occ, gate, agent, term.fence, record
                    )
            span.set_attribute("mission_runner.outcome", record.outcome)
            if record.outcome in ("written", "failed", "duplicate"):
                self._done[occ.key] = occ.at_us
                self._failures.pop(occ.key, None)
            if record.tokens and gate.gated:
                self.budget.add(agent_key, record.tokens, self.clock.now_us())
        except asyncio.CancelledError:
            record.outcome = "cancelled"
            raise
        except FencedError as exc:
            record.outcome, record.error = "fenced", str(exc)
            log.warning("mission %s: %s", occ.mission_id, exc)
        except Exception as exc:  # one mission's failure must not stop the others
            record.error = f"{type(exc).__name__}: {exc}"
            if giving_up:
                # Not even the failed iteration or the ledger could be written: stop trying
                # in this process (a restart tries again, bounded the same way).
                self._done[occ.key] = occ.at_us
                self._failures.pop(occ.key, None)
                log.error(
                    "mission %s: giving up on occurrence %s: %s",
                    occ.mission_id,
                    occ.at_iso,
                    record.error,
                    extra={"mission_id": occ.mission_id},
                )
            else:
                self._note_failure(occ, exc)
        finally:
            if record.error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, record.error[:200]))
            span.end()
            record.finished_us = self.clock.now_us()
            self.recent.appendleft(record)
            self._release(occ, agent_key, term)

    def _note_failure(self, occ: Occurrence, exc: Exception) -> None:
        """Count a failed dispatch and arm its retry (backoff); after `max_attempts` the
        next dispatch gives up with the failed iteration."""
        failures = self._failures.get(occ.key)
        if failures is None or failures.at_us != occ.at_us:
            failures = self._failures[occ.key] = _Failures(occ.at_us, 0, 0, "")
        failures.count += 1
        failures.last_error = f"{type(exc).__name__}: {exc}"[:500]
        delay = self.options.retry.delay(failures.count)
        failures.retry_at_us = self.clock.now_us() + int(delay * 1_000_000)
        sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
        self.metrics.dispatch_failures.labels(sqlstate or type(exc).__name__).inc()
        self.metrics.mission_errors.inc()
        log.error(
            "dispatch %d/%d of mission %s failed (retrying in %.1f s): %s",
            failures.count,
            self.options.max_attempts,
            occ.mission_id,
            delay,
            failures.last_error,
            extra={"mission_id": occ.mission_id},
        )

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch due missions in every term this instance leads, until `stop`; then drain
        in-flight work (bounded)."""
        async with asyncio.TaskGroup() as tg:
            scheduler = tg.create_task(self._follow_schedule(stop), name="scheduler")
            feed = tg.create_task(self._follow_feed(stop), name="change feed")
            prune = tg.create_task(self._prune(stop), name="prune")
            term: Term | None = None
            while not stop.is_set():
                new = self.terms.take_new(term)
                if new is None:
                    await wait_first(stop, self.terms.began)
                    continue
                term = new
                await self._serve_term(term, stop)
            self._stopping = True
            self.scheduler.disable()
            await self.drain()
            feed.cancel()
            prune.cancel()
            await scheduler

    async def _prune(self, stop: asyncio.Event) -> None:
        while not await sleep_or_stop(stop, PRUNE_EVERY):
            term = self._term
            if term is None or not term.dispatching:
                continue
            try:
                async with self.pool.connection() as conn:
                    await usage.prune(conn, term.fence)
                    await ledger.prune(
                        conn, term.fence, older_than_days=self.options.ledger_keep_days
                    )
            except (psycopg.Error, FencedError) as exc:
                log.warning("pruning token usage and ledger failed: %s", exc)

    async def drain(self) -> None:
        """Let in-flight dispatches finish within the grace period, then cancel the rest."""
        self._stopping = True
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=self.options.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
            log.warning(
                "shutdown: %d dispatches cancelled (they will be planned again)", len(pending)
            )
