"""The apply/persist side of ingest: committed transactions into the snapshot stores, and the
stores into the database in group commits.

`stream.supervisor` drives it: it hands over each committed transaction (`apply`), asks
whether a keepalive's position may be confirmed (`idle_position`), and runs the group
commit (`persist`), which returns the position that may now be confirmed to the slot. This
module never touches the replication connection; it publishes what changed to the mission
runtime's feed.

Invariants:
- The checkpoint persisted with a batch is the applied position when the batch was taken;
  every change applied up to it is in that batch or an earlier one. Serialising a large
  batch yields to the event loop between chunks, so a record may be written with changes
  applied after the checkpoint: harmless, since replaying from the checkpoint joins them in
  again (the merge is idempotent), and the record is dirty again for the next batch.
- A position returned by `persist` or `idle_position` loses nothing when confirmed: every
  snapshot change before it is persisted (see `idle_position` for the idle case).
- What a group commit took stays held until a group commit commits it: an attempt that
  fails, gives up or is cancelled leaves it for the next one, so a later batch never
  carries a checkpoint past changes that were not written.
- After a persist refused by the fence, the stores are no longer known to match the
  database: the next term boots from it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psycopg
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool

from core import pgerrors
from core.aio import Stopped, sleep_or_stop
from core.backoff import Backoff
from core.clock import Clock
from core.failpoints import FailPoints
from core.json_types import JsonValue
from core.lsn import ZERO, Lsn
from planner.due import MissionKey
from planner.feed import ChangeFeed
from projections import persistence
from projections.backfill import load_table
from projections.errors import PersistenceError
from projections.group_commit import GroupCommit, GroupCommitOptions
from projections.merge import RecordState, agent_view
from projections.metrics import SnapshotMetrics
from projections.persistence import Checkpoint, PersistBatch
from projections.projector import Applying, DeadLetter, Outcome, Projector, Transaction
from projections.stores import SnapshotStore
from writer.fence import Fence

log = logging.getLogger(__name__)
tracer = trace.get_tracer("projections.ingest")

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]]


@dataclass(frozen=True, slots=True)
class _Captured:
    batch: PersistBatch
    seq: int


class SnapshotViews:
    """The runtime's view of the snapshots (`planner.snapshots.Snapshots`)."""

    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest

    def mission(self, key: MissionKey) -> Mapping[str, JsonValue] | None:
        state = self._ingest.missions.get(*key)
        if state is None or not state.exists or state.deleted:
            return None
        return state.values

    def agent(self, user_id: str, agent_id: str) -> Mapping[str, JsonValue] | None:
        state = self._ingest.agents.get(user_id, agent_id)
        return None if state is None else agent_view(state)

    def mission_keys(self) -> Iterator[MissionKey]:
        for state in self._ingest.missions:
            yield (state.user_id, state.record_id)


class Ingest:
    """Owns the snapshot stores and keeps them equal to the log, durably."""

    def __init__(
        self,
        *,
        slot: str,
        persist_pool: Pool,
        clock: Clock,
        metrics: SnapshotMetrics,
        options: GroupCommitOptions,
        retry: Backoff,
        feed: ChangeFeed | None = None,
        failpoints: FailPoints | None = None,
        compiled: bool = True,
        apply_step: int = 5000,
    ) -> None:
        self.slot = slot
        self.persist_pool = persist_pool
        self.clock = clock
        self.metrics = metrics
        self.options = options
        self.retry = retry
        self.feed = feed
        self.failpoints = failpoints or FailPoints()
        self.compiled = compiled
        self.apply_step = apply_step
        """Rows of a transaction applied per turn of the event loop."""
        self.persist_wanted = asyncio.Event()
        """Set when a group commit may have become due sooner (its owner waits on it)."""
        self.persisted: Checkpoint | None = None
        self.rows_applied = 0
        self.transactions_applied = 0
        self._persist_lock = asyncio.Lock()
        self._batch_span: trace.Span | None = None
        self._new_state()

    def _new_state(self) -> None:
        self.missions = SnapshotStore("mission")
        self.agents = SnapshotStore("agent")
        self.projector = Projector(
            missions=self.missions, agents=self.agents, compiled=self.compiled
        )
        self._applying: tuple[Transaction, Applying] | None = None
        self._dead_letters: list[DeadLetter] = []
        # Taken for a group commit that has not committed (yet): kept until one does, so a
        # failed, abandoned or cancelled attempt loses nothing for the next one.
        self._unwritten_missions: dict[tuple[str, str], RecordState] = {}
        self._unwritten_agents: dict[tuple[str, str], RecordState] = {}
        self._unwritten_dead: list[DeadLetter] = []
        # Snapshot-changing transactions applied / persisted, counted (see is_idle).
        self._data_seq = 0
        self._persisted_seq = 0
        self.group_commit = GroupCommit(self.options)
        # The open ingest-batch span: from the first snapshot change to its group commit
        # (one left open by a term that ended is ended here, unwritten).
        if self._batch_span is not None:
            self._batch_span.end()
        self._batch_span = None
        self._batch_first_lsn: Lsn | None = None
        self._batch_tx = 0
        self._batch_rows = 0

    # -- positions ------------------------------------------------------------------------

    @property
    def applied_lsn(self) -> Lsn:
        return self.projector.applied_lsn

    @property
    def applied_commit_time_us(self) -> int | None:
        return self.projector.applied_commit_time_us

    @property
    def persisted_lsn(self) -> Lsn:
        return ZERO if self.persisted is None else self.persisted.lsn

    def is_idle(self) -> bool:
        """Nothing applied is waiting to be persisted."""
        return self._persisted_seq == self._data_seq

    # -- boot -----------------------------------------------------------------------------

    async def boot(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        """Forget what is in memory and load the persisted snapshots and checkpoint (no
        replay of history). Called at the start of every term."""
        self._new_state()
        self.persisted = await persistence.read_checkpoint(conn, self.slot)
        async for chunk in persistence.load_snapshots(conn, "mission"):
            self.missions.restore(chunk)
        async for chunk in persistence.load_snapshots(conn, "agent"):
            self.agents.restore(chunk)
        if self.persisted is not None:
            self.projector.applied_lsn = self.persisted.lsn
            self.projector.applied_commit_time_us = self.persisted.commit_time_us
        self._update_snapshot_gauges()
        if self.feed is not None:
            self.feed.reset()
        log.info(
            "booted from persisted state: %d missions, %d agents, checkpoint %s",
            len(self.missions),
            len(self.agents),
            self.persisted.lsn if self.persisted else "none",
        )

    async def discard(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]], fence: Fence
    ) -> None:
        """Forget snapshots and checkpoint, in memory and persisted (`rebuild`)."""
        await persistence.reset(conn, fence)
        self._new_state()
        self.persisted = None

    async def load(
        self,
        conn: psycopg.AsyncConnection[tuple[object, ...]],
        *,
        snapshot_name: str | None,
        lsn: Lsn,
    ) -> Outcome:
        """Merge every row of the table visible in the exported snapshot `snapshot_name`
        (the slot just created at `lsn`) into the stores; `persist` writes it."""
        started = self.clock.monotonic()
        outcome = await load_table(
            conn,
            self.projector,
            snapshot_name=snapshot_name,
            lsn=lsn,
            now_us=self.clock.now_us(),
            failpoints=self.failpoints,
        )
        self._account(outcome)
        # Rows committed before the consistent point are in the load; later ones will come
        # from the stream. Anything applied earlier from an old slot stays merged in (the
        # merge is a join), so a rebuild never loses what the table no longer holds.
        self.projector.applied_lsn = lsn
        self.projector.applied_commit_time_us = self.clock.now_us()
        self._data_seq += 1
        self.group_commit.note_change(self.clock.monotonic(), outcome.rows)
        self.persist_wanted.set()
        log.info(
            "loaded %d rows (%d missions, %d agents) in %.2f s",
            outcome.rows,
            len(self.missions),
            len(self.agents),
            self.clock.monotonic() - started,
        )
        self._publish(outcome)
        return outcome

    # -- apply ----------------------------------------------------------------------------

    def apply(self, tx: Transaction) -> bool:
        """Apply one committed transaction (skipped when it was applied before). False when
        it is large and only its first `apply_step` rows are applied: the caller then awaits
        `finish()` before it hands over anything else."""
        if len(tx.inserts) >= 1000:
            self.failpoints.hit("before-apply-large")
        applying = self.projector.start(tx)
        if applying is None:
            self.metrics.skipped_transactions.inc()
            return True
        if applying.step(self.apply_step):
            self._applied(tx, applying.outcome)
            return True
        self._applying = (tx, applying)
        if self.feed is not None:
            self.feed.settled.clear()  # the runtime judges nothing on half a transaction
        return False

    async def finish(self) -> None:
        """Apply the rest of the transaction `apply` started, `apply_step` rows per turn of
        the event loop, so no step holds the loop for long."""
        if self._applying is None:
            return
        tx, applying = self._applying
        try:
            while True:
                await asyncio.sleep(0)
                if applying.step(self.apply_step):
                    break
        finally:
            self._applying = None
            if self.feed is not None:
                self.feed.settled.set()
        self._applied(tx, applying.outcome)

    def _applied(self, tx: Transaction, outcome: Outcome) -> None:
        self.metrics.commit_to_apply.observe(
            max(0.0, (self.clock.now_us() - tx.commit_time_us) / 1_000_000)
        )
        self.metrics.transactions.inc()
        self.transactions_applied += 1
        self._account(outcome)
        if outcome.changed_missions or outcome.changed_agents or outcome.dead_letters:
            rows = outcome.rows + len(outcome.dead_letters)
            self._note_batch(tx.commit_lsn, rows)
            self._data_seq += 1
            self.group_commit.note_change(self.clock.monotonic(), rows)
        else:
            # Nothing to persist (heartbeat, marker, rows that changed nothing): the
            # checkpoint may move lazily.
            self.group_commit.note_checkpoint(self.clock.monotonic())
        self.persist_wanted.set()
        self._publish(outcome)

    def idle_position(self, lsn: Lsn) -> bool:
        """The server has sent everything before `lsn` (a keepalive's WAL end, no
        transaction open) and none of it is pending here: True when `lsn` may be confirmed.

        Invariant: when every snapshot change is persisted, the server has sent everything
        before `lsn`, and none of it changed a snapshot, confirming `lsn` loses nothing,
        even before the checkpoint row says so: a restart streams from the later of our
        checkpoint and the slot's position, and nothing relevant lies between them. Doing
        it at once (not after a database write) also lets a shutting-down server's
        walsender finish, which waits for us to confirm everything it sent.
        """
        # Applied in memory either way: everything before `lsn` was received and no
        # transaction is open (the stream's guarantee), so nothing before it is missing.
        self.projector.advance(lsn)
        if not self.is_idle():
            return False
        self.group_commit.note_checkpoint(self.clock.monotonic())
        self.persist_wanted.set()
        return True

    def _publish(self, outcome: Outcome) -> None:
        if self.feed is not None and (outcome.changed_missions or outcome.changed_agents):
            self.feed.publish(
                outcome.changed_missions, outcome.changed_agents, self.current_batch()
            )

    def _note_batch(self, lsn: Lsn, rows: int) -> None:
        if self._batch_span is None:
            self._batch_span = tracer.start_span("ingest.batch", kind=trace.SpanKind.CONSUMER)
            self._batch_first_lsn = lsn
            self._batch_tx = 0
            self._batch_rows = 0
        self._batch_tx += 1
        self._batch_rows += rows

    def current_batch(self) -> trace.SpanContext | None:
        """The span context of the batch being applied now (for links from dispatches)."""
        span = self._batch_span
        if span is None:
            return None
        ctx = span.get_span_context()
        return ctx if ctx.is_valid else None

    def _account(self, outcome: Outcome) -> None:
        m = self.metrics
        if outcome.mission_rows:
            m.rows.labels("aiMissions").inc(outcome.mission_rows)
        if outcome.agent_rows:
            m.rows.labels("agents").inc(outcome.agent_rows)
        m.rows_applied.inc(outcome.rows)
        self.rows_applied += outcome.rows
        changed = len(outcome.changed_missions) + len(outcome.changed_agents)
        if changed:
            m.snapshots_updated.inc(changed)
        if outcome.new_records:
            m.snapshots_new.inc(outcome.new_records)
        if outcome.invalid_stamps:
            m.invalid_stamps.inc(outcome.invalid_stamps)
        for dl in outcome.dead_letters:
            m.dead_letters.labels(dl.reason).inc()
            log.warning(
                "dead letter at %s: event %s: %s",
                dl.lsn,
                dl.event_id,
                dl.reason,
                extra={"lsn": str(dl.lsn), "event_id": dl.event_id},
            )
        self._dead_letters.extend(outcome.dead_letters)
        if changed or outcome.new_records:
            self._update_snapshot_gauges()

    def _update_snapshot_gauges(self) -> None:
        self.metrics.snapshots.labels("mission").set(self.missions.live_count())
        self.metrics.snapshots.labels("agent").set(self.agents.live_count())

    # -- group commit ---------------------------------------------------------------------

    def persist_deadline(self) -> float | None:
        """When (monotonic) the next group commit is due; None: nothing to write."""
        return self.group_commit.deadline()

    async def _capture(self) -> _Captured | None:
        """Take everything applied so far. The dirty sets, dead letters and the position are
        taken at once (synchronously); the records are then serialised in chunks, yielding
        to the event loop between them (see the module invariants)."""
        applied = self.projector.applied_lsn
        seq = self._data_seq
        for state in self.missions.take_dirty():
            self._unwritten_missions[(state.user_id, state.record_id)] = state
        for state in self.agents.take_dirty():
            self._unwritten_agents[(state.user_id, state.record_id)] = state
        self._unwritten_dead.extend(self._dead_letters)
        self._dead_letters = []
        self.group_commit.taken()
        missions = list(self._unwritten_missions.values())
        agents = list(self._unwritten_agents.values())
        dead = list(self._unwritten_dead)
        if applied <= self.persisted_lsn and not missions and not agents and not dead:
            return None
        checkpoint = Checkpoint(self.slot, applied, self.projector.applied_commit_time_us)
        batch = PersistBatch(
            missions=await _serialize(missions, self.options.serialize_chunk),
            agents=await _serialize(agents, self.options.serialize_chunk),
            dead_letters=dead,
            checkpoint=checkpoint,
        )
        return _Captured(batch, seq)

    async def persist(self, fence: Fence, stop: asyncio.Event | None = None) -> Lsn | None:
        """Persist what is applied (one group commit); the position that may now be
        confirmed to the slot, or None when there was nothing to write.

        Transient database errors are retried with the backoff (until `stop` is set:
        `core.aio.Stopped`); FencedError (another instance leads) and PersistenceError (a
        non-transient error: privileges, schema) propagate, and the stores must then be
        booted again before they are trusted."""
        async with self._persist_lock:
            started = self.clock.monotonic()
            captured = await self._capture()
            if captured is None:
                return None
            batch = captured.batch
            span, self._batch_span = self._batch_span, None
            if span is None:
                span = tracer.start_span("ingest.batch", kind=trace.SpanKind.CONSUMER)
            span.set_attributes(
                {
                    "mission_runner.lsn.first": str(self._batch_first_lsn or batch.checkpoint.lsn),
                    "mission_runner.lsn.last": str(batch.checkpoint.lsn),
                    "mission_runner.transactions": self._batch_tx,
                    "mission_runner.rows": self._batch_rows,
                    "mission_runner.snapshots": len(batch.missions) + len(batch.agents),
                    "mission_runner.dead_letters": len(batch.dead_letters),
                    "mission_runner.epoch": fence.epoch,
                }
            )
            self._batch_first_lsn, self._batch_tx, self._batch_rows = None, 0, 0
            try:
                with trace.use_span(span, end_on_exit=False):
                    await self._write(batch, fence, stop)
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                raise
            finally:
                span.end()
            # Committed: what it carried is written (a state changed since is dirty again).
            self._unwritten_missions.clear()
            self._unwritten_agents.clear()
            del self._unwritten_dead[: len(batch.dead_letters)]
            ended = self.clock.monotonic()
            self.group_commit.persisted(started, ended)
            self.failpoints.hit("after-persist")
            self.persisted = batch.checkpoint
            self._persisted_seq = max(self._persisted_seq, captured.seq)
            self.metrics.persist_batches.inc()
            self.metrics.persist_seconds.observe(ended - started)
            self.metrics.checkpoint_lsn.set(int(batch.checkpoint.lsn))
            return batch.checkpoint.lsn

    async def _write(self, batch: PersistBatch, fence: Fence, stop: asyncio.Event | None) -> None:
        attempt = 0
        while True:
            try:
                with tracer.start_as_current_span(
                    "db.persist",
                    kind=trace.SpanKind.CLIENT,
                    attributes={"db.system": "postgresql", "db.operation": "snapshots+checkpoint"},
                ):
                    async with self.persist_pool.connection() as conn:
                        await persistence.write_batch(conn, batch, fence)
                return
            except (psycopg.Error, OSError) as exc:
                kind = pgerrors.sqlstate_of(exc) or type(exc).__name__
                self.metrics.persist_errors.labels(kind).inc()
                if not pgerrors.transient(exc):
                    raise PersistenceError(
                        f"persisting snapshots failed and will not succeed by retrying: {exc}",
                        sqlstate=pgerrors.sqlstate_of(exc),
                    ) from exc
                attempt += 1
                delay = self.retry.delay(attempt)
                log.error(
                    "persisting snapshots failed (attempt %d, retrying in %.1f s): %s",
                    attempt,
                    delay,
                    exc,
                )
                if stop is None:
                    await asyncio.sleep(delay)
                elif await sleep_or_stop(stop, delay):
                    raise Stopped from exc


async def _serialize(states: list[RecordState], chunk: int) -> list[persistence.SnapshotRow]:
    """`persistence.serialize` of every state, yielding to the event loop every `chunk`."""
    out: list[persistence.SnapshotRow] = []
    serialize = persistence.serialize
    for start in range(0, len(states), chunk):
        if start:
            await asyncio.sleep(0)
        out.extend(serialize(s) for s in states[start : start + chunk])
    return out
