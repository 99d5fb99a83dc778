"""Ingest: the replication stream into persisted mission and agent snapshots.

Wires the replication connection (stream/), the projector and stores (projections/) and the
group-commit persister, and supervises them: reconnect with backoff and jitter, gap-free
(re)builds when the slot is new, missing or lost.

Invariants:
- The slot is confirmed only up to the persisted checkpoint (see `_persist_now`).
- A load from the table happens only in the snapshot exported by the slot being created,
  and streaming then starts at that slot's consistent point: no gap, no double-apply.
- Nothing here waits on the replication socket; `stream.consumer` does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable
from enum import StrEnum

import psycopg
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool

from core import failpoints
from core import sync_changes as sc
from core.clock import Clock
from core.errors import MissionRunnerError, SetupError
from core.lsn import Lsn
from mission_runner.leader import LeaderLock
from mission_runner.metrics import Metrics
from mission_runner.migrations import migrate
from mission_runner.settings import Settings
from projections import persistence
from projections.backfill import load_table
from projections.errors import PersistenceError
from projections.persistence import Checkpoint, PersistBatch
from projections.projector import DeadLetter, Outcome, Projector
from projections.stores import SnapshotStore
from stream import slots
from stream.consumer import ReplicationConnection, StreamOptions
from stream.errors import (
    ConnectionLostError,
    DecodeError,
    LeadershipLost,
    ReplicationError,
    SlotInUseError,
    SlotLostError,
)
from stream.pgoutput import LogicalMessage
from stream.transactions import CommittedTransaction

log = logging.getLogger(__name__)
tracer = trace.get_tracer("mission_runner.ingest")

HEARTBEAT_PREFIX = "mission_runner.heartbeat"
CATCHUP_PREFIX = "mission_runner.catchup"

Listener = Callable[[Outcome], None]


class Phase(StrEnum):
    BOOTING = "booting"
    LOADING = "loading"
    STREAMING = "streaming"
    WAITING = "waiting"
    STOPPED = "stopped"


class Ingestor:
    """Owns the snapshot stores and keeps them equal to the log, durably."""

    PERSIST_DUTY = 8

    def __init__(
        self,
        *,
        settings: Settings,
        conninfo: str,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]],
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.conninfo = conninfo
        self.pool = pool
        self.clock = clock
        self.metrics = metrics
        self.missions = SnapshotStore("mission")
        self.agents = SnapshotStore("agent")
        self.projector = Projector(missions=self.missions, agents=self.agents)
        self.phase: Phase = Phase.BOOTING
        self._session_streamed = False
        self.persisted: Checkpoint | None = None
        self.last_error: str | None = None
        self._listeners: list[Listener] = []
        self._dead_letters: list[DeadLetter] = []
        self._pending_tx = 0
        self._pending_rows = 0
        self._first_pending: float | None = None
        self._checkpoint_due: float | None = None
        self._last_persist_end = 0.0
        self._last_persist_cost = 0.0
        # Snapshot-changing transactions applied / persisted, counted (see is_idle).
        self._data_seq = 0
        self._persisted_seq = 0
        # The open ingest-batch span: from the first snapshot change to its group commit.
        self._batch_span: trace.Span | None = None
        self._batch_first_lsn: Lsn | None = None
        self._batch_tx = 0
        self._batch_rows = 0
        self._persist_wake = asyncio.Event()
        self._persist_lock = asyncio.Lock()
        self._repl: ReplicationConnection | None = None
        self._markers: dict[str, asyncio.Future[Lsn]] = {}
        self.streaming = asyncio.Event()
        self.rows_applied = 0
        self.transactions_applied = 0

    # -- wiring -------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Called after every applied transaction or load, with what changed."""
        self._listeners.append(listener)

    @property
    def persisted_lsn(self) -> Lsn:
        return Lsn(0) if self.persisted is None else self.persisted.lsn

    @property
    def replication(self) -> ReplicationConnection | None:
        return self._repl

    async def boot(self) -> None:
        """Migrate, then load the persisted snapshots and checkpoint (no replay of history).

        Listeners attach after boot and index what is loaded themselves (the runtime's
        `load`), so boot notifies nobody."""
        async with self.pool.connection() as conn:
            await migrate(conn)
            self.persisted = await persistence.read_checkpoint(conn, self.settings.slot)
            async for chunk in persistence.load_snapshots(conn, "mission"):
                self.missions.restore(chunk)
            async for chunk in persistence.load_snapshots(conn, "agent"):
                self.agents.restore(chunk)
        if self.persisted is not None:
            self.projector.applied_lsn = self.persisted.lsn
            self.projector.applied_commit_time_us = self.persisted.commit_time_us
        self._update_snapshot_gauges()
        log.info(
            "booted from persisted state: %d missions, %d agents, checkpoint %s",
            len(self.missions),
            len(self.agents),
            self.persisted.lsn if self.persisted else "none",
        )

    async def preflight(self) -> None:
        """Check what only an operator can fix, before streaming: raises SetupError."""
        async with self.pool.connection() as conn:
            if not await slots.source_table_exists(conn):
                raise SetupError(
                    f"table {sc.QUALIFIED_NAME} does not exist",
                    fix="point DATABASE_URL at the sync service's database "
                    "(for development: mission-runner dev-schema)",
                )
            await slots.ensure_publication(conn, self.settings.publication)
            slot = await slots.get_slot(conn, self.settings.slot)
            if slot is not None:
                await slots.check_slot_usable(conn, slot)

    # -- the sink the replication connection calls ----------------------------------------

    def on_transaction(self, tx: CommittedTransaction) -> None:
        if len(tx.inserts) >= 1000:
            failpoints.hit("before-apply-large")
        outcome = self.projector.apply_transaction(tx)
        if outcome is None:
            self.metrics.stream_skipped_transactions.inc()
            return
        delay = (self.clock.now_us() - tx.commit_time_us) / 1_000_000
        self.metrics.commit_to_apply.observe(max(0.0, delay))
        self.metrics.stream_transactions.inc()
        self.transactions_applied += 1
        self._account(outcome)
        for msg in tx.messages:
            if msg.prefix == CATCHUP_PREFIX:
                waiter = self._markers.pop(msg.content.decode("ascii", "replace"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(tx.end_lsn)
        if outcome.changed_missions or outcome.changed_agents or outcome.dead_letters:
            self._note_batch(tx.commit_lsn, outcome.rows + len(outcome.dead_letters))
            self._data_seq += 1
            self._pending_tx += 1
            self._pending_rows += outcome.rows + len(outcome.dead_letters)
            if self._first_pending is None:
                self._first_pending = self.clock.monotonic()
            self._persist_wake.set()
        else:
            # Nothing to persist (heartbeat, marker, rows that changed nothing).
            self._advance_idle(tx.end_lsn)
        self._notify(outcome)

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

    def on_logical_message(self, msg: LogicalMessage) -> None:
        """Non-transactional messages carry nothing for us."""

    def on_idle_position(self, lsn: Lsn) -> None:
        self.projector.advance(lsn)
        self._advance_idle(lsn)

    def is_idle(self) -> bool:
        """Nothing applied is waiting to be persisted."""
        return self._persisted_seq == self._data_seq

    def _advance_idle(self, lsn: Lsn) -> None:
        """Confirm a position past which nothing of ours is pending.

        Invariant: when every snapshot change is persisted, the server has sent everything
        before `lsn`, and none of it changed a snapshot, confirming `lsn` loses nothing,
        even before the checkpoint row says so: a restart streams from the later of our
        checkpoint and the slot's position, and nothing relevant lies between them. Doing
        it at once (not after a database write) also lets a shutting-down server's
        walsender finish, which waits for us to confirm everything it sent.
        """
        if not self.is_idle():
            return
        if self._repl is not None:
            self._repl.confirm(lsn)
        if self._checkpoint_due is None:
            self._checkpoint_due = self.clock.monotonic() + self.settings.status_interval
            self._persist_wake.set()

    def _account(self, outcome: Outcome) -> None:
        m = self.metrics
        if outcome.mission_rows:
            m.stream_rows.labels("aiMissions").inc(outcome.mission_rows)
        if outcome.agent_rows:
            m.stream_rows.labels("agents").inc(outcome.agent_rows)
        m.snapshot_rows_applied.inc(outcome.rows)
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

    def _notify(self, outcome: Outcome) -> None:
        for listener in self._listeners:
            listener(outcome)

    # -- group commit ---------------------------------------------------------------------

    def _batch_full(self) -> bool:
        s = self.settings
        return (
            self._pending_tx >= s.batch_max_transactions or self._pending_rows >= s.batch_max_rows
        )

    def _persist_deadline(self) -> float | None:
        """When the persister should next write: soon after snapshot changes (group commit),
        lazily for a checkpoint that only moved over empty transactions.

        Persisting never takes more than about 1/PERSIST_DUTY of the time: the next write is
        due no sooner than PERSIST_DUTY times the cost of the last one after it ended. Idle
        or lightly loaded, writes take milliseconds and the delay stays `batch_max_delay`;
        catching up, batches grow instead of the same records being written again and again.
        """
        floor = self._last_persist_end + self.PERSIST_DUTY * self._last_persist_cost
        if self._first_pending is not None:
            if self._batch_full():
                return floor
            return max(self._first_pending + self.settings.batch_max_delay, floor)
        if self._checkpoint_due is None:
            return None
        return max(self._checkpoint_due, floor)

    def _capture(self) -> tuple[PersistBatch, int] | None:
        """Take everything applied so far, serialised now. Synchronous, so atomic with
        respect to the stream: the checkpoint matches exactly the captured changes."""
        applied = self.projector.applied_lsn
        seq = self._data_seq
        missions = self.missions.take_dirty()
        agents = self.agents.take_dirty()
        self._first_pending = None
        self._checkpoint_due = None
        self._pending_tx = 0
        self._pending_rows = 0
        if applied <= self.persisted_lsn and not missions and not agents and not self._dead_letters:
            return None
        dead, self._dead_letters = self._dead_letters, []
        batch = PersistBatch(
            missions=[persistence.serialize(s) for s in missions],
            agents=[persistence.serialize(s) for s in agents],
            dead_letters=dead,
            checkpoint=Checkpoint(
                self.settings.slot, applied, self.projector.applied_commit_time_us
            ),
        )
        return batch, seq

    async def persist_now(self) -> None:
        """Persist what is applied, then confirm it to the slot."""
        async with self._persist_lock:
            started = self.clock.monotonic()
            captured = self._capture()
            if captured is None:
                return
            batch, seq = captured
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
                }
            )
            self._batch_first_lsn, self._batch_tx, self._batch_rows = None, 0, 0
            attempt = 0
            while True:
                try:
                    with (
                        trace.use_span(span, end_on_exit=False),
                        tracer.start_as_current_span(
                            "db.persist",
                            kind=trace.SpanKind.CLIENT,
                            attributes={
                                "db.system": "postgresql",
                                "db.operation": "snapshots+checkpoint",
                            },
                        ),
                    ):
                        async with self.pool.connection() as conn:
                            await persistence.write_batch(conn, batch)
                    break
                except (psycopg.Error, OSError) as exc:
                    attempt += 1
                    self.last_error = f"persisting failed: {exc}"
                    log.error("persisting snapshots failed (attempt %d): %s", attempt, exc)
                    await asyncio.sleep(self._backoff(attempt))
            span.end()
            self._last_persist_end = self.clock.monotonic()
            self._last_persist_cost = self._last_persist_end - started
            failpoints.hit("after-persist")
            self.persisted = batch.checkpoint
            self._persisted_seq = max(self._persisted_seq, seq)
            self.metrics.persist_batches.inc()
            self.metrics.persist_seconds.observe(self.clock.monotonic() - started)
            self.metrics.checkpoint_lsn.set(int(batch.checkpoint.lsn))
            # Invariant: confirm only now, after the batch and its checkpoint committed.
            if self._repl is not None:
                self._repl.confirm(batch.checkpoint.lsn)

    async def _persister(self) -> None:
        while True:
            deadline = self._persist_deadline()
            if deadline is None:
                await self._persist_wake.wait()
                self._persist_wake.clear()
                continue
            remaining = deadline - self.clock.monotonic()
            if remaining > 0:
                try:
                    async with asyncio.timeout(remaining):
                        await self._persist_wake.wait()
                except TimeoutError:
                    pass
                self._persist_wake.clear()
                continue
            await self.persist_now()

    # -- heartbeat ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """A transactional message keeps a quiet sync_changes from pinning WAL."""
        interval = self.settings.heartbeat_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if not self.streaming.is_set():
                continue
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "SELECT pg_logical_emit_message(true, %s, %s)",
                        (HEARTBEAT_PREFIX, str(self.clock.now_us())),
                    )
            except psycopg.errors.InsufficientPrivilege as exc:
                log.error("heartbeat disabled: %s (grant EXECUTE on pg_logical_emit_message)", exc)
                return
            except psycopg.Error as exc:
                log.warning("heartbeat failed: %s", exc)

    # -- the session loop -----------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        base = min(s.reconnect_max_backoff, s.reconnect_min_backoff * (2 ** min(attempt, 20)))
        return random.uniform(base / 2, base)

    async def run(self, stop: asyncio.Event, *, catch_up: bool = False) -> None:
        """Stream until `stop` is set (or, with `catch_up`, until everything committed before
        the call is applied, persisted and confirmed). SetupError at start is fatal; later
        (say, a rebuild that needs a privilege) it is logged and retried, never a crash loop.

        Only one instance streams a slot: `run` waits for the leader lock (not ready
        meanwhile) and stops streaming if it loses it; `catch_up` refuses when it is held."""
        await self.preflight()
        lock = LeaderLock(conninfo=self.conninfo, slot=self.settings.slot)
        if catch_up and not await lock.try_acquire():
            raise MissionRunnerError(
                f"another instance is active for slot {self.settings.slot}: stop it first"
            )
        async with asyncio.TaskGroup() as tg:
            persister = tg.create_task(self._persister(), name="persister")
            heartbeat = tg.create_task(self._heartbeat(), name="heartbeat")
            try:
                while not stop.is_set():
                    self.phase = Phase.WAITING
                    if not lock.held and not await lock.acquire(stop):
                        break
                    try:
                        await self._lead(lock, stop, catch_up)
                    except* LeadershipLost as group:
                        self.last_error = str(group.exceptions[0])
                        log.error("%s; waiting to become active again", self.last_error)
                    finally:
                        await lock.release()
                    if catch_up:
                        break
            finally:
                persister.cancel()
                heartbeat.cancel()
        self.phase = Phase.STOPPED

    async def _lead(self, lock: LeaderLock, stop: asyncio.Event, catch_up: bool) -> None:
        """Stream while holding the lock; losing it ends the session (LeadershipLost)."""
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(lock.watch(), name="leader watch")
            await self._supervise(stop, catch_up)
            watch.cancel()

    async def _supervise(self, stop: asyncio.Event, catch_up: bool) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                await self._session(stop, catch_up)
                return
            except SlotLostError as exc:
                self.last_error = str(exc)
                log.error("replication slot unusable: %s; rebuilding", exc)
                self.metrics.reconnects.labels("slot-lost").inc()
                attempt += 1
                delay = 0.0 if attempt == 1 else self._backoff(attempt)
            except SlotInUseError as exc:
                self.last_error = str(exc)
                self.phase = Phase.WAITING
                log.warning("waiting for the slot: %s", exc)
                self.metrics.reconnects.labels("slot-in-use").inc()
                attempt += 1
                delay = self._backoff(attempt)
            except (ConnectionLostError, psycopg.OperationalError, OSError) as exc:
                self.last_error = str(exc)
                log.warning("replication connection lost: %s", exc)
                self.metrics.reconnects.labels("connection").inc()
                attempt += 1
                delay = self._backoff(attempt)
            except (DecodeError, ReplicationError, SetupError, PersistenceError) as exc:
                self.last_error = str(exc)
                log.error("replication failed: %s", exc)
                self.metrics.reconnects.labels(type(exc).__name__).inc()
                attempt += 1
                delay = self._backoff(attempt)
            if self._session_streamed:
                attempt = 0
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                pass

    async def _session(self, stop: asyncio.Event, catch_up: bool) -> None:
        self._session_streamed = False
        repl = await ReplicationConnection.connect(self.conninfo, clock=self.clock)
        try:
            async with self.pool.connection() as conn:
                await slots.ensure_publication(conn, self.settings.publication)
                slot = await slots.get_slot(conn, self.settings.slot)
            start = await self._prepare_slot(repl, slot)
            options = StreamOptions(
                slot=self.settings.slot,
                publication=self.settings.publication,
                proto_version=2 if repl.server_version >= 140000 else 1,
                streaming=self.settings.streaming,
                status_interval=self.settings.status_interval,
            )
            self._repl = repl
            catching_up = asyncio.ensure_future(self._catch_up(stop)) if catch_up else None
            try:
                await repl.stream(start, self, options, on_started=self._on_started, stop=stop)
            finally:
                if catching_up is not None:
                    catching_up.cancel()
                self.streaming.clear()
                self.metrics.streaming.set(0)
            # Stopped on request: persist what is applied and confirm it before closing.
            await self.persist_now()
            await repl.send_status()
        finally:
            self._repl = None
            if self.phase != Phase.STOPPED:
                self.phase = Phase.WAITING
            await repl.close()

    def _on_started(self) -> None:
        self._session_streamed = True
        self.phase = Phase.STREAMING
        self.last_error = None
        self.streaming.set()
        self.metrics.streaming.set(1)

    async def sync_point(self, *, persisted: bool = True) -> Lsn:
        """Wait until everything committed before this call is applied (and, by default,
        persisted and confirmed). Emits a transactional marker message and waits for it to
        come back through the stream: commit order makes everything before it arrive first."""
        token = uuid.uuid4().hex
        future: asyncio.Future[Lsn] = asyncio.get_running_loop().create_future()
        self._markers[token] = future
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "SELECT pg_logical_emit_message(true, %s, %s)", (CATCHUP_PREFIX, token)
                )
            lsn = await future
        finally:
            self._markers.pop(token, None)
        if persisted:
            while self.persisted_lsn < lsn:
                await self.persist_now()
                if self.persisted_lsn < lsn:
                    await asyncio.sleep(0.01)
        return lsn

    async def _catch_up(self, stop: asyncio.Event) -> None:
        await self.sync_point(persisted=True)
        stop.set()

    async def _prepare_slot(self, repl: ReplicationConnection, slot: slots.SlotInfo | None) -> Lsn:
        """Decide where to stream from; create (and load) the slot when needed."""
        name = self.settings.slot
        checkpoint = self.persisted
        reason: str | None = None
        if slot is not None:
            async with self.pool.connection() as conn:
                await slots.check_slot_usable(conn, slot)
            if slot.active:
                raise SlotInUseError(
                    f"replication slot {name!r} is active for PID {slot.active_pid}", slot=name
                )
            if slot.lost:
                reason = "slot-invalidated"
            elif checkpoint is None:
                reason = "slot-without-checkpoint"
        elif checkpoint is not None:
            reason = "slot-missing"
        if slot is not None and reason is None:
            assert checkpoint is not None
            return checkpoint.lsn
        if reason is not None and reason != "slot-without-checkpoint":
            log.error(
                "replication slot %s: %s (checkpoint %s, wal_status %s); rebuilding from "
                "sync_changes without a gap",
                name,
                reason,
                checkpoint.lsn if checkpoint else "none",
                slot.wal_status if slot else "n/a",
            )
            self.metrics.rebuilds.labels(reason).inc()
        if slot is not None:
            async with self.pool.connection() as conn:
                await slots.drop_slot(conn, name)
        return await self._create_and_load(repl)

    async def _create_and_load(self, repl: ReplicationConnection) -> Lsn:
        self.phase = Phase.LOADING
        created = await repl.create_slot(self.settings.slot, export_snapshot=True)
        log.info(
            "created slot %s at %s; loading sync_changes in its snapshot",
            created.name,
            created.consistent_point,
        )
        started = self.clock.monotonic()
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        try:
            outcome = await load_table(
                conn,
                self.projector,
                snapshot_name=created.snapshot_name,
                lsn=created.consistent_point,
                now_us=self.clock.now_us(),
            )
        finally:
            await conn.close()
        self._account(outcome)
        # Rows committed before the consistent point are in the load; later ones will come
        # from the stream. Anything we applied earlier from an old slot stays merged in
        # (the merge is a join), so a rebuild never loses what the table no longer holds.
        self.projector.applied_lsn = created.consistent_point
        self.projector.applied_commit_time_us = self.clock.now_us()
        self._data_seq += 1
        await self.persist_now()
        log.info(
            "loaded %d rows (%d missions, %d agents) in %.2f s",
            outcome.rows,
            len(self.missions),
            len(self.agents),
            self.clock.monotonic() - started,
        )
        self._notify(outcome)
        return created.consistent_point

    async def discard_state(self) -> None:
        """Forget snapshots and checkpoint, in memory and persisted (`rebuild`)."""
        async with self.pool.connection() as conn:
            await migrate(conn)
            await persistence.reset(conn, self.settings.slot)
            await slots.drop_slot(conn, self.settings.slot)
        self.missions.clear()
        self.agents.clear()
        self.projector.applied_lsn = Lsn(0)
        self.persisted = None
        self._dead_letters.clear()


__all__ = ["Ingestor", "MissionRunnerError", "Phase"]
