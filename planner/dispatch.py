"""One dispatch: an occurrence that passed the gates, through the planner, into an iteration.

`Dispatcher.dispatch` claims the occurrence in the ledger, plans it (retrying the planner's
transient errors with backoff, counted durably in the ledger), and writes the iteration
back; `Dispatcher.give_up` ends an occurrence whose dispatches kept failing outside the
planner with the failed iteration the user sees.

Invariants:
- Every write runs behind the term's fence: a deposed instance writes nothing.
- The mission is re-read from the snapshots before planning and before writing: if its
  occurrence changed meanwhile, the attempt is abandoned (ledger `abandoned`), not written.
- The iteration row, the ledger row turning final and the token usage are one transaction
  (`writer.iterations.write_back`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import psycopg
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool

from core.backoff import Backoff
from core.clock import Clock
from core.failpoints import FailPoints
from core.json_types import JsonValue
from planner.due import Occurrence, occurrence_of
from planner.errors import PlannerError
from planner.gates import GateResult
from planner.metrics import RuntimeMetrics
from planner.service import MissionPlanner, PlanOutcome
from planner.snapshots import Snapshots
from writer import ledger
from writer.fence import Fence
from writer.iterations import (
    WriteBack,
    build_actor,
    build_iteration,
    iteration_id_for,
    write_back,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("planner.dispatch")

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]]


@dataclass(slots=True)
class DispatchRecord:
    """One finished dispatch, for the status API."""

    user_id: str
    mission_id: str
    occurrence_us: int
    agent_id: str
    outcome: str  # written | failed | abandoned | duplicate | error | cancelled | fenced
    started_us: int
    finished_us: int
    steps: int = 0
    tokens: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Planned:
    plan: PlanOutcome | None  # None: the attempts ran out, `error` says why
    error: PlannerError | None
    attempts: int


def _db_span(operation: str) -> AbstractContextManager[trace.Span]:
    return tracer.start_as_current_span(
        f"db.{operation}",
        kind=trace.SpanKind.CLIENT,
        attributes={"db.system": "postgresql", "db.operation": operation},
    )


class Dispatcher:
    def __init__(
        self,
        *,
        pool: Pool,
        planner: MissionPlanner,
        snapshots: Snapshots,
        clock: Clock,
        metrics: RuntimeMetrics,
        max_attempts: int,
        retry: Backoff,
        failpoints: FailPoints,
    ) -> None:
        self.pool = pool
        self.planner = planner
        self.snapshots = snapshots
        self.clock = clock
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.retry = retry
        self.failpoints = failpoints

    def _current(self, occ: Occurrence) -> Mapping[str, JsonValue] | None:
        """The mission's values if `occ` is still its current occurrence."""
        values = self.snapshots.mission(occ.key)
        if values is None or occurrence_of(occ.key, values) != occ:
            return None
        return values

    async def dispatch(
        self,
        occ: Occurrence,
        gate: GateResult,
        agent: Mapping[str, JsonValue] | None,
        fence: Fence,
        record: DispatchRecord,
    ) -> str:
        """Plan and write one occurrence; returns the outcome (see DispatchRecord)."""
        iteration_id = iteration_id_for(occ.user_id, occ.mission_id, occ.at_us)
        entry = await self._claim(occ, iteration_id, fence)
        if entry is None:
            return "duplicate"
        started = self.clock.now_us()
        self.metrics.dispatch_delay.observe(max(0.0, (started - occ.at_us) / 1_000_000))
        planned = await self._plan(occ, gate, agent, fence, iteration_id, entry.attempts)
        if isinstance(planned, str):
            return planned
        self.failpoints.hit("after-planner")
        values = self._current(occ)
        if values is None:
            return await self._abandon(occ, fence, "the mission changed while it was planned")
        iteration, status, tokens = self._iteration(planned, iteration_id, started, record)
        return await self._write(occ, gate, fence, values, iteration, status, tokens, record)

    async def give_up(
        self, occ: Occurrence, gate: GateResult, fence: Fence, error: str, attempts: int
    ) -> str:
        """End an occurrence after `attempts` failed dispatches: the failed iteration, or, when
        even that cannot be written, the ledger row marked failed with the error."""
        values = self._current(occ)
        if values is None:
            return "abandoned"
        iteration_id = iteration_id_for(occ.user_id, occ.mission_id, occ.at_us)
        now = self.clock.now_us()
        iteration = build_iteration(
            iteration_id=iteration_id,
            started_us=now,
            finished_us=now,
            summary=f"Planning failed: {error}",
            steps=(),
            error={"kind": "dispatch-failed", "message": error, "attempts": attempts},
        )
        record = DispatchRecord(occ.user_id, occ.mission_id, occ.at_us, gate.agent_id, "", now, 0)
        try:
            return await self._write(occ, gate, fence, values, iteration, "failed", 0, record)
        except psycopg.Error as exc:
            log.error(
                "mission %s: could not write the failed iteration either (%s); marking the"
                " occurrence failed in the ledger",
                occ.mission_id,
                exc,
                extra={"mission_id": occ.mission_id},
            )
            async with self.pool.connection() as conn:
                await ledger.note_error(
                    conn,
                    fence,
                    occ.user_id,
                    occ.mission_id,
                    occ.at_us,
                    f"{error}; the failed iteration could not be written: {exc}",
                    status="failed",
                )
            return "failed"

    # -- steps ----------------------------------------------------------------------------

    async def _claim(
        self, occ: Occurrence, iteration_id: str, fence: Fence
    ) -> ledger.LedgerEntry | None:
        """Count one more planning attempt; None when the occurrence is already final."""
        with _db_span("ledger.claim"):
            async with self.pool.connection() as conn:
                entry = await ledger.claim(
                    conn, fence, occ.user_id, occ.mission_id, occ.at_us, iteration_id
                )
        return None if entry.final else entry

    async def _plan(
        self,
        occ: Occurrence,
        gate: GateResult,
        agent: Mapping[str, JsonValue] | None,
        fence: Fence,
        iteration_id: str,
        attempt: int,
    ) -> _Planned | str:
        """Planner attempts up to `max_attempts` (counted in the ledger): the plan, or the
        last error; "abandoned"/"duplicate" when the occurrence changed or ended meanwhile."""
        error: PlannerError | None = None
        while attempt <= self.max_attempts:
            values = self._current(occ)
            if values is None:
                return await self._abandon(occ, fence, "the mission changed before planning")
            try:
                with tracer.start_as_current_span(
                    "planner.plan", attributes={"mission_runner.attempt": attempt}
                ) as span:
                    plan = await self.planner.plan_mission(values, agent, gate)
                    span.set_attributes(
                        {
                            "mission_runner.planner.rounds": plan.rounds,
                            "mission_runner.planner.steps": len(plan.steps),
                            "mission_runner.planner.tokens": plan.tokens,
                        }
                    )
                return _Planned(plan, None, attempt)
            except PlannerError as exc:
                error = exc
                provider = getattr(exc, "provider", self.planner.name)
                self.metrics.provider_errors.labels(str(provider), exc.kind).inc()
                log.warning(
                    "planner attempt %d/%d for mission %s failed: %s",
                    attempt,
                    self.max_attempts,
                    occ.mission_id,
                    exc,
                    extra={"mission_id": occ.mission_id, "agent_id": gate.agent_id},
                )
                if not exc.retryable or attempt >= self.max_attempts:
                    break
            async with self.pool.connection() as conn:
                await ledger.note_error(
                    conn, fence, occ.user_id, occ.mission_id, occ.at_us, str(error)
                )
            await self.clock.sleep(
                self.retry.delay(attempt, at_least=getattr(error, "retry_after", None))
            )
            entry = await self._claim(occ, iteration_id, fence)
            if entry is None:
                return "duplicate"
            attempt = entry.attempts
        return _Planned(None, error, attempt)

    def _iteration(
        self, planned: _Planned, iteration_id: str, started: int, record: DispatchRecord
    ) -> tuple[dict[str, JsonValue], str, int]:
        """The iteration to write, its final ledger status and the tokens it used."""
        finished = self.clock.now_us()
        plan = planned.plan
        if plan is not None:
            m = self.metrics
            m.plans_produced.inc()
            m.planner_rounds.observe(plan.rounds)
            if plan.parse_failures:
                m.parse_failures.inc(plan.parse_failures)
            for call in plan.calls:
                m.tool_calls.labels(call.tool, call.policy, call.outcome).inc()
            record.steps = len(plan.steps)
            iteration = build_iteration(
                iteration_id=iteration_id,
                started_us=started,
                finished_us=finished,
                summary=plan.summary,
                steps=plan.steps,
            )
            return iteration, "written", plan.tokens
        error = planned.error
        kind = error.kind if error is not None else "attempts-exhausted"
        message = error.message if error is not None else "planning attempts exhausted"
        record.error = f"{kind}: {message}"
        self.metrics.mission_errors.inc()
        iteration = build_iteration(
            iteration_id=iteration_id,
            started_us=started,
            finished_us=finished,
            summary=f"Planning failed: {message}",
            steps=(),
            error={"kind": kind, "message": message, "attempts": planned.attempts},
        )
        return iteration, "failed", 0

    async def _write(
        self,
        occ: Occurrence,
        gate: GateResult,
        fence: Fence,
        values: Mapping[str, JsonValue],
        iteration: dict[str, JsonValue],
        status: str,
        tokens: int,
        record: DispatchRecord,
    ) -> str:
        previous = values.get("iterations")
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
                iteration_id=str(iteration["id"]),
                rationale=values.get("objective"),
            ),
            final_status=status,
            now_us=self.clock.now_us(),
            usage_agent_id=gate.agent_id if gate.gated else None,
            tokens=tokens,
        )
        with _db_span("iteration.write_back"):
            async with self.pool.connection() as conn:
                written = await write_back(conn, wb, fence)
        self.failpoints.hit("after-write-back")
        if not written:
            return "duplicate"
        self.metrics.plans_written_back.inc()
        if wb.usage_agent_id is not None and tokens > 0:
            record.tokens = tokens
            self.metrics.tokens_used.labels(wb.usage_agent_id).inc(tokens)
        log.info(
            "mission %s: iteration %s %s (%d steps)",
            occ.mission_id,
            iteration["id"],
            status,
            record.steps,
            extra={"mission_id": occ.mission_id, "agent_id": gate.agent_id},
        )
        return status

    async def _abandon(self, occ: Occurrence, fence: Fence, why: str) -> str:
        async with self.pool.connection() as conn:
            await ledger.note_error(
                conn, fence, occ.user_id, occ.mission_id, occ.at_us, why, status="abandoned"
            )
        return "abandoned"
