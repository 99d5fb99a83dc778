"""The mission runtime: due missions from the snapshots, through the gates, to the planner,
and their iterations back into `sync_changes`, exactly once per occurrence.

Wiring: from `load` on, the ingestor calls `_on_applied` after every applied transaction
(synchronously, in the stream's task), which keeps the due index current; the scheduler hands
out due occurrences; each one that passes the gates becomes a dispatch task.

Invariants:
- Nothing here queries `sync_changes` to find due missions: the index is fed by the stream.
- Dispatching starts only after the stream has caught up with what was committed before
  start, so a mission is never judged on a snapshot older than the log at start; and every
  judgement reads the latest applied snapshot (applying is synchronous in this thread).
- The write-back re-checks that the occurrence is still current; the ledger row and the
  iteration row are written in one transaction (writer.iterations).
- Shutdown stops taking work, lets in-flight dispatches finish within a grace period and
  cancels the rest: a cancelled write-back transaction rolls back, leaving the occurrence
  `planning`, to be planned again after restart. Nothing is half-written.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import psycopg
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool

from core import failpoints
from core.clock import Clock
from core.json_types import JsonValue
from mission_runner.ingest import Ingestor
from mission_runner.metrics import Metrics
from mission_runner.settings import Settings
from planner.budget import TokenBudget
from planner.due import MissionKey, Occurrence, occurrence_of
from planner.errors import PlannerError
from planner.gates import LEGACY_AGENT_ID, Decision, GateResult, decide
from planner.scheduler import Scheduler
from planner.service import MissionPlanner, PlanOutcome
from projections.merge import agent_view
from projections.projector import Outcome
from writer import ledger, usage
from writer.iterations import (
    WriteBack,
    build_actor,
    build_iteration,
    iteration_id_for,
    write_back,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("mission_runner.missions")

AgentKey = tuple[str, str]


@dataclass(slots=True)
class DispatchRecord:
    """One finished dispatch, for the status API."""

    user_id: str
    mission_id: str
    occurrence_us: int
    agent_id: str
    outcome: str  # written | failed | abandoned | duplicate | error
    started_us: int
    finished_us: int
    steps: int = 0
    error: str | None = None


@dataclass(slots=True)
class _Agent:
    in_flight: int = 0
    deferred: deque[Occurrence] = field(default_factory=deque)
    parked: set[MissionKey] = field(default_factory=set)


def _db_span(operation: str) -> AbstractContextManager[trace.Span]:
    return tracer.start_as_current_span(
        f"db.{operation}",
        kind=trace.SpanKind.CLIENT,
        attributes={"db.system": "postgresql", "db.operation": operation},
    )


class MissionRuntime:
    def __init__(
        self,
        *,
        settings: Settings,
        ingestor: Ingestor,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]],
        planner: MissionPlanner,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.pool = pool
        self.planner = planner
        self.clock = clock
        self.metrics = metrics
        self.scheduler = Scheduler(clock=clock, on_due=self._on_due)
        self.budget = TokenBudget()
        self.recent: deque[DispatchRecord] = deque(maxlen=50)
        self._done: dict[MissionKey, int] = {}
        self._agents: dict[AgentKey, _Agent] = {}
        self._in_flight: dict[MissionKey, Occurrence] = {}
        # The ingest batch that last (re)scheduled each mission: the dispatch span links to it.
        self._scheduled_by: dict[MissionKey, trace.SpanContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False

    # -- state ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def accepting(self) -> bool:
        """True once the stream caught up at start and until shutdown begins."""
        return self._accepting

    async def load(self) -> None:
        """The ledger's finished occurrences and the token window; then index every mission."""
        async with self.pool.connection() as conn:
            for entry in await ledger.load_latest_final(conn):
                self._done[(entry.user_id, entry.mission_id)] = entry.occurrence_us
            await usage.prune(conn)
            for u in await usage.load_window(conn):
                self.budget.add((u.user_id, u.agent_id), u.tokens, u.ts_us)
        # From here on every applied transaction keeps the index current (not before: a
        # process that never runs the runtime, like catch-up, pays nothing for it).
        self.ingestor.add_listener(self._on_applied)
        for state in self.ingestor.missions:
            self._reindex((state.user_id, state.record_id))
        self.metrics.due_queue.set(len(self.scheduler.index))
        log.info(
            "mission runtime loaded: %d missions scheduled, %d finished occurrences",
            len(self.scheduler.index),
            len(self._done),
        )

    def _agent(self, key: AgentKey) -> _Agent:
        agent = self._agents.get(key)
        if agent is None:
            agent = self._agents[key] = _Agent()
        return agent

    def _current_occurrence(self, key: MissionKey) -> Occurrence | None:
        state = self.ingestor.missions.get(*key)
        if state is None or not state.exists or state.deleted:
            return None
        return occurrence_of(key, state.values)

    def _reindex(self, key: MissionKey, batch: trace.SpanContext | None = None) -> None:
        occ = self._current_occurrence(key)
        if occ is None or self._done.get(key) == occ.at_us or key in self._in_flight:
            self.scheduler.discard(key)
            self._scheduled_by.pop(key, None)
        else:
            self.scheduler.set(occ)
            if batch is not None:
                self._scheduled_by[key] = batch

    def _on_applied(self, outcome: Outcome) -> None:
        batch = self.ingestor.current_batch()
        for key in outcome.changed_missions:
            self._reindex(key, batch)
        for agent_key in outcome.changed_agents:
            agent = self._agents.get(agent_key)
            if agent is not None and agent.parked:
                parked, agent.parked = agent.parked, set()
                for key in parked:
                    self._reindex(key, batch)
        self.metrics.due_queue.set(len(self.scheduler.index))

    # -- decisions --------------------------------------------------------------------

    def _on_due(self, due: list[Occurrence]) -> None:
        for occ in due:
            self._evaluate(occ)

    def _evaluate(self, occ: Occurrence) -> None:
        if not self._accepting:
            return
        key = occ.key
        if self._current_occurrence(key) != occ or self._done.get(key) == occ.at_us:
            return  # changed since it was indexed; _reindex already rescheduled it
        if key in self._in_flight:
            return
        state = self.ingestor.missions.get(*key)
        assert state is not None
        mission = state.values
        agent_id = mission.get("agentId")
        agent_state = (
            self.ingestor.agents.get(key[0], agent_id)
            if isinstance(agent_id, str) and agent_id
            else None
        )
        agent = agent_view(agent_state) if agent_state is not None else None
        agent_key: AgentKey = (key[0], agent_id) if isinstance(agent_id, str) else (key[0], "")
        slot = self._agent(agent_key)
        now = self.clock.now_us()
        gate = decide(
            mission,
            agent,
            in_flight=slot.in_flight,
            tokens_last_24h=self.budget.used(agent_key, now),
        )
        if gate.gated:
            self.metrics.agent_decisions.labels(gate.decision.value).inc()
        match gate.decision:
            case Decision.RAN:
                self._start(
                    occ, gate, agent_key if gate.gated else (key[0], LEGACY_AGENT_ID), agent
                )
            case Decision.SKIPPED_CONCURRENCY:
                slot.deferred.append(occ)
            case Decision.SKIPPED_BUDGET:
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
    ) -> None:
        self._in_flight[occ.key] = occ
        self._agent(agent_key).in_flight += 1
        self.metrics.in_flight.set(len(self._in_flight))
        task = asyncio.create_task(
            self._dispatch(occ, gate, agent_key, agent), name=f"dispatch {occ.mission_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, occ: Occurrence, agent_key: AgentKey) -> None:
        self._in_flight.pop(occ.key, None)
        self.metrics.in_flight.set(len(self._in_flight))
        slot = self._agent(agent_key)
        slot.in_flight = max(0, slot.in_flight - 1)
        self._reindex(occ.key)
        self.metrics.due_queue.set(len(self.scheduler.index))
        # One slot freed: deferred missions of this agent go through the gates again, oldest
        # first, until one of them takes the slot (or has to wait again).
        while slot.deferred:
            waiting = slot.deferred.popleft()
            before = slot.in_flight
            self._evaluate(waiting)
            if slot.in_flight > before:
                break
            if slot.deferred and slot.deferred[-1] is waiting:
                slot.deferred.rotate(1)  # still at the limit: back to the front, in order
                break

    # -- one dispatch -----------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        base = self.settings.planner_retry_base * (2 ** (attempt - 1))
        delay = random.uniform(base / 2, base)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, 60.0)

    async def _dispatch(
        self,
        occ: Occurrence,
        gate: GateResult,
        agent_key: AgentKey,
        agent: Mapping[str, JsonValue] | None,
    ) -> None:
        record = DispatchRecord(
            occ.user_id, occ.mission_id, occ.at_us, gate.agent_id, "error", self.clock.now_us(), 0
        )
        batch = self._scheduled_by.pop(occ.key, None)
        span = tracer.start_span(
            "mission.dispatch",
            links=[trace.Link(batch)] if batch is not None else None,
            attributes={
                "mission_runner.mission_id": occ.mission_id,
                "mission_runner.user_id": occ.user_id,
                "mission_runner.agent_id": gate.agent_id,
                "mission_runner.occurrence": occ.at_iso,
                "mission_runner.gate.decision": gate.decision.value,
                "mission_runner.gate.gated": gate.gated,
                "mission_runner.planner": self.planner.name,
            },
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                record.outcome = await self._plan_and_write(occ, gate, agent, record)
            span.set_attribute("mission_runner.outcome", record.outcome)
        except asyncio.CancelledError:
            record.outcome = "cancelled"
            raise
        except Exception as exc:  # one mission's failure must not stop the others
            record.error = str(exc)
            self.metrics.mission_errors.inc()
            log.exception(
                "dispatch of mission %s failed",
                occ.mission_id,
                extra={"mission_id": occ.mission_id, "agent_id": gate.agent_id},
            )
        finally:
            if record.error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, record.error[:200]))
            span.end()
            record.finished_us = self.clock.now_us()
            self.recent.appendleft(record)
            self._release(occ, agent_key)

    async def _plan_and_write(
        self,
        occ: Occurrence,
        gate: GateResult,
        agent: Mapping[str, JsonValue] | None,
        record: DispatchRecord,
    ) -> str:
        iteration_id = iteration_id_for(occ.user_id, occ.mission_id, occ.at_us)
        ctx = {"mission_id": occ.mission_id, "agent_id": gate.agent_id}
        entry = await self._claim(occ, iteration_id)
        if entry is None:
            return "duplicate"
        started = self.clock.now_us()
        self.metrics.dispatch_delay.observe(max(0.0, (started - occ.at_us) / 1_000_000))
        max_attempts = self.settings.planner_max_attempts
        attempt = entry.attempts
        plan: PlanOutcome | None = None
        error: PlannerError | None = None
        while attempt <= max_attempts:
            state = self.ingestor.missions.get(*occ.key)
            if state is None or self._current_occurrence(occ.key) != occ:
                return await self._abandon(occ, "the mission changed before planning")
            try:
                with tracer.start_as_current_span(
                    "planner.plan", attributes={"mission_runner.attempt": attempt}
                ) as plan_span:
                    plan = await self.planner.plan_mission(state.values, agent, gate)
                    plan_span.set_attributes(
                        {
                            "mission_runner.planner.rounds": plan.rounds,
                            "mission_runner.planner.steps": len(plan.steps),
                            "mission_runner.planner.tokens": plan.tokens,
                        }
                    )
                break
            except PlannerError as exc:
                error = exc
                provider = getattr(exc, "provider", self.planner.name)
                self.metrics.provider_errors.labels(str(provider), exc.kind).inc()
                log.warning(
                    "planner attempt %d/%d for mission %s failed: %s",
                    attempt,
                    max_attempts,
                    occ.mission_id,
                    exc,
                    extra=ctx,
                )
                if not exc.retryable or attempt >= max_attempts:
                    break
                async with self.pool.connection() as conn:
                    await ledger.note_error(conn, occ.user_id, occ.mission_id, occ.at_us, str(exc))
                await asyncio.sleep(self._backoff(attempt, getattr(exc, "retry_after", None)))
                entry = await self._claim(occ, iteration_id)
                if entry is None:
                    return "duplicate"
                attempt = entry.attempts
        failpoints.hit("after-planner")
        state = self.ingestor.missions.get(*occ.key)
        if state is None or self._current_occurrence(occ.key) != occ:
            return await self._abandon(occ, "the mission changed while it was planned")
        finished = self.clock.now_us()
        if plan is not None:
            self.metrics.plans_produced.inc()
            self.metrics.planner_rounds.observe(plan.rounds)
            if plan.parse_failures:
                self.metrics.parse_failures.inc(plan.parse_failures)
            for call in plan.calls:
                self.metrics.tool_calls.labels(call.tool, call.policy, call.outcome).inc()
            iteration = build_iteration(
                iteration_id=iteration_id,
                started_us=started,
                finished_us=finished,
                summary=plan.summary,
                steps=plan.steps,
            )
            status, tokens = "written", plan.tokens
            record.steps = len(plan.steps)
        else:
            kind = error.kind if error is not None else "attempts-exhausted"
            message = error.message if error is not None else "planning attempts exhausted"
            iteration = build_iteration(
                iteration_id=iteration_id,
                started_us=started,
                finished_us=finished,
                summary=f"Planning failed: {message}",
                steps=(),
                error={"kind": kind, "message": message, "attempts": attempt},
            )
            status, tokens = "failed", 0
            record.error = f"{kind}: {message}"
            self.metrics.mission_errors.inc()
        previous = state.values.get("iterations")
        wb = WriteBack(
            user_id=occ.user_id,
            mission_id=occ.mission_id,
            occurrence_us=occ.at_us,
            iteration=iteration,
            previous_iterations=list(previous) if isinstance(previous, list) else [],
            actor=build_actor(
                agent_id=gate.agent_id,
                agent_name=gate.agent_name,
                mission_id=occ.mission_id,
                iteration_id=iteration_id,
                rationale=state.values.get("objective"),
            ),
            final_status=status,
            now_us=finished,
            usage_agent_id=gate.agent_id if gate.gated else None,
            tokens=tokens,
        )
        with _db_span("iteration.write_back"):
            async with self.pool.connection() as conn:
                written = await write_back(conn, wb)
        failpoints.hit("after-write-back")
        self._done[occ.key] = occ.at_us
        if not written:
            return "duplicate"
        self.metrics.plans_written_back.inc()
        if wb.usage_agent_id is not None and tokens > 0:
            self.budget.add((occ.user_id, wb.usage_agent_id), tokens, finished)
            self.metrics.tokens_used.labels(wb.usage_agent_id).inc(tokens)
        log.info(
            "mission %s: iteration %s %s (%d steps)",
            occ.mission_id,
            iteration_id,
            status,
            record.steps,
            extra=ctx,
        )
        return status

    async def _claim(self, occ: Occurrence, iteration_id: str) -> ledger.LedgerEntry | None:
        """Count one more planning attempt; None when the occurrence is already final."""
        with _db_span("ledger.claim"):
            async with self.pool.connection() as conn:
                entry = await ledger.claim(
                    conn, occ.user_id, occ.mission_id, occ.at_us, iteration_id
                )
        if entry.final:
            self._done[occ.key] = occ.at_us
            return None
        return entry

    async def _abandon(self, occ: Occurrence, why: str) -> str:
        async with self.pool.connection() as conn:
            await ledger.note_error(
                conn, occ.user_id, occ.mission_id, occ.at_us, why, status="abandoned"
            )
        return "abandoned"

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch due missions until `stop`; then drain in-flight work (bounded)."""
        await self.load()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._enable_when_caught_up(stop), name="catch-up gate")
            tg.create_task(self.scheduler.run(stop), name="scheduler")
            tg.create_task(self._prune(stop), name="prune")
            await stop.wait()
            self._accepting = False
        await self.drain()

    async def _enable_when_caught_up(self, stop: asyncio.Event) -> None:
        streaming = asyncio.ensure_future(self.ingestor.streaming.wait())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({streaming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            streaming.cancel()
            stopping.cancel()
        if stop.is_set():
            return
        await self.ingestor.sync_point(persisted=False)
        self._accepting = True
        self.scheduler.enable()
        log.info("stream caught up: dispatching due missions")

    async def _prune(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(3600):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            try:
                async with self.pool.connection() as conn:
                    await usage.prune(conn)
                    await ledger.prune(conn, older_than_days=self.settings.ledger_keep_days)
            except psycopg.Error as exc:
                log.warning("pruning token usage and ledger failed: %s", exc)

    async def drain(self) -> None:
        """Let in-flight dispatches finish within the grace period, then cancel the rest."""
        self._accepting = False
        if not self._tasks:
            return
        done, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
            log.warning(
                "shutdown: %d dispatches cancelled (they will be planned again)", len(pending)
            )
        del done
