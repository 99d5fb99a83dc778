"""The ingest supervisor: lead the slot, stream it into the projections, persist, confirm.

One instance leads a slot at a time (`stream.leader`). Each time this instance takes the
lock it starts a *term*: it increments the slot's fencing token (`writer.fence`), boots the
snapshots from the database, and streams, reconnecting with backoff and rebuilding the slot
gap-free when it is missing or invalidated. The term ends when the lock (or the fence) is
lost: streaming, persisting and dispatching stop at once, nothing more is confirmed, and the
instance waits to lead again. A database outage ends the term the same way; the instance
stays up, not ready, and resumes from its checkpoint when the server is back.

Invariants:
- The slot is confirmed only up to a position the projections returned: a group commit's
  checkpoint (`Ingest.persist`) or an idle keepalive position (`Ingest.idle_position`).
- A load from the table happens only in the snapshot exported by the slot being created,
  and streaming then starts at that slot's consistent point: no gap, no double-apply.
- Every persisting transaction of a term runs behind its fence; a refused one
  (`FencedError`) ends the term.
- Nothing here waits on the replication socket; `stream.consumer` does.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

import psycopg
from psycopg_pool import AsyncConnectionPool

from core import pgerrors
from core.aio import Stopped, sleep_or_stop, wait_first
from core.backoff import Backoff
from core.clock import Clock
from core.errors import MissionRunnerError, SetupError
from core.lsn import Lsn
from core.sync_changes import QUALIFIED_NAME
from planner.terms import Term, Terms
from projections.errors import PersistenceError
from projections.ingest import Ingest
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
from stream.lag import LagTracker
from stream.leader import LeaderLock
from stream.messages import LogicalMessage
from stream.metrics import StreamMetrics
from stream.transactions import CommittedTransaction
from writer.errors import FencedError
from writer.fence import Fence, take_leadership

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "mission_runner.heartbeat"
CATCHUP_PREFIX = "mission_runner.catchup"
FINAL_PERSIST_TIMEOUT = 5.0

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]]
Conn = psycopg.AsyncConnection[tuple[object, ...]]
Prepare = Callable[[Conn, Fence], Awaitable[None]]
"""Run at the start of a term, after the epoch is taken and before the snapshots are read
(`rebuild` discards them, `replay` moves the checkpoint)."""


class Phase(StrEnum):
    BOOTING = "booting"
    WAITING = "waiting"
    LOADING = "loading"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class SupervisorOptions:
    slot: str
    publication: str
    status_interval: float = 10.0
    heartbeat_interval: float = 30.0
    streaming: bool = True
    compiled: bool = True
    reconnect: Backoff = field(default_factory=lambda: Backoff(0.5, 30.0))
    lock_check_interval: float = 2.0
    lock_check_timeout: float = 5.0
    instance: str = ""
    """This instance's name in `application_name` (the pod's host name)."""


class Supervisor:
    """Leads, streams and persists one slot for this instance (see the module docstring)."""

    def __init__(
        self,
        *,
        conninfo: str,
        pool: Pool,
        ingest: Ingest,
        terms: Terms,
        options: SupervisorOptions,
        clock: Clock,
        metrics: StreamMetrics,
    ) -> None:
        self.conninfo = conninfo
        self.pool = pool
        self.ingest = ingest
        self.terms = terms
        self.options = options
        self.clock = clock
        self.metrics = metrics
        self.lock = LeaderLock(
            conninfo=conninfo,
            slot=options.slot,
            backoff=options.reconnect,
            check_interval=options.lock_check_interval,
            check_timeout=options.lock_check_timeout,
            instance=options.instance,
        )
        self.lag = LagTracker()
        self.phase = Phase.BOOTING
        self.last_error: str | None = None
        self.streaming = asyncio.Event()
        self.booted = asyncio.Event()
        """Set once the snapshots were first loaded (the process-wide GC tuning waits on it)."""
        self.replication: ReplicationConnection | None = None
        self.term: Term | None = None
        self._markers: dict[str, asyncio.Future[Lsn]] = {}
        self._stream_started = False
        self.caught_up = False
        """Catch-up mode: everything committed before the run is applied and persisted."""

    # -- start ------------------------------------------------------------------------------

    async def preflight(self) -> None:
        """Check what only an operator can fix, before leading: raises SetupError."""
        async with self.pool.connection() as conn:
            if not await slots.source_table_exists(conn):
                raise SetupError(
                    f"table {QUALIFIED_NAME} does not exist",
                    fix="point DATABASE_URL at the sync service's database "
                    "(for development: mission-runner dev-schema)",
                )
            await slots.ensure_publication(conn, self.options.publication)
            slot = await slots.get_slot(conn, self.options.slot)
            if slot is not None:
                await slots.check_slot_usable(conn, slot)

    async def run(
        self, stop: asyncio.Event, *, catch_up: bool = False, prepare: Prepare | None = None
    ) -> None:
        """Lead and stream until `stop` is set. With `catch_up`, lead once (refusing when
        another instance leads), apply everything committed before the call, persist and
        confirm it, and return. SetupError at start, PersistenceError (a write that will not
        succeed) at any time, and MissionRunnerError for a refused catch-up propagate."""
        await self.preflight()
        self.caught_up = False
        try:
            while not stop.is_set():
                self.phase = Phase.WAITING
                if catch_up:
                    if not await self.lock.try_acquire():
                        raise MissionRunnerError(
                            f"another instance is active for slot {self.options.slot}:"
                            " stop it first"
                        )
                elif not await self.lock.acquire(stop):
                    break
                try:
                    await self._lead(stop, catch_up, prepare)
                except* LeadershipLost as group:
                    self.last_error = str(group.exceptions[0])
                    self.metrics.leadership_lost.inc()
                    if catch_up:
                        raise MissionRunnerError(f"catch-up stopped: {self.last_error}") from None
                    log.error("%s; waiting to lead again", self.last_error)
                finally:
                    await self.lock.release()
                    self.metrics.leader.set(0)
                    self.metrics.leader_epoch.set(0)
                if catch_up:
                    break
        finally:
            self.phase = Phase.STOPPED

    # -- one term -----------------------------------------------------------------------

    async def _begin_term(self, stop: asyncio.Event, prepare: Prepare | None) -> Fence:
        """Take the epoch, run `prepare`, boot the snapshots and take the first WAL sample;
        retried while the database fails transiently and the lock holds."""
        attempt = 0
        while True:
            try:
                async with self.pool.connection() as conn:
                    fence = await take_leadership(conn, self.options.slot)
                    if prepare is not None:
                        await prepare(conn, fence)
                    await self.ingest.boot(conn)
                    self.booted.set()
                    self.lag.reset()
                    self.lag.sample(await slots.current_wal_lsn(conn), self.clock.now_us())
                return fence
            except (psycopg.Error, OSError) as exc:
                if not pgerrors.transient(exc):
                    raise PersistenceError(
                        f"starting to lead slot {self.options.slot} failed: {exc}",
                        sqlstate=pgerrors.sqlstate_of(exc),
                    ) from exc
                attempt += 1
                self.last_error = f"starting a term failed: {exc}"
                log.warning("%s; retrying", self.last_error)
                await self.lock.check()
                if await sleep_or_stop(stop, self.options.reconnect.delay(attempt)):
                    raise LeadershipLost("stopping") from None

    async def _lead(self, stop: asyncio.Event, catch_up: bool, prepare: Prepare | None) -> None:
        """One term: stream while holding the lock; losing it raises LeadershipLost."""
        self.phase = Phase.BOOTING
        fence = await self._begin_term(stop, prepare)
        term = self.term = self.terms.begin(fence)
        self.metrics.leader.set(1)
        self.metrics.leader_epoch.set(fence.epoch)
        log.info("leading slot %s in epoch %d", self.options.slot, fence.epoch)
        session_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                watch = tg.create_task(self.lock.watch(), name="leader watch")
                persister = tg.create_task(self._persister(term, session_stop), name="persister")
                heartbeat = tg.create_task(self._heartbeat(), name="heartbeat")
                relay = tg.create_task(self._relay_stop(stop, session_stop), name="stop relay")
                await self._sessions(term, session_stop, catch_up)
                for task in (watch, persister, heartbeat, relay):
                    task.cancel()
        finally:
            self.terms.end(term)
            self.term = None
            self.streaming.clear()
            self.metrics.streaming.set(0)

    @staticmethod
    async def _relay_stop(stop: asyncio.Event, session_stop: asyncio.Event) -> None:
        await stop.wait()
        session_stop.set()

    async def _sessions(self, term: Term, stop: asyncio.Event, catch_up: bool) -> None:
        """Stream until `stop`, reconnecting with backoff; rebuild a lost slot at once."""
        attempt = 0
        while not stop.is_set():
            delay = 0.0
            try:
                await self._session(term, stop, catch_up)
                return
            except SlotLostError as exc:
                self._failed(exc, "slot-lost", "replication slot unusable: %s; rebuilding")
                attempt += 1
                delay = 0.0 if attempt == 1 else self.options.reconnect.delay(attempt)
            except SlotInUseError as exc:
                self._failed(exc, "slot-in-use", "waiting for the slot: %s")
                attempt += 1
                delay = self.options.reconnect.delay(attempt)
            except (ConnectionLostError, psycopg.OperationalError, OSError) as exc:
                self._failed(exc, "connection", "replication connection lost: %s")
                attempt += 1
                delay = self.options.reconnect.delay(attempt)
            except (DecodeError, ReplicationError, SetupError) as exc:
                self._failed(exc, type(exc).__name__, "replication failed: %s")
                attempt += 1
                delay = self.options.reconnect.delay(attempt)
            if self._stream_started:
                attempt = 0
            self.phase = Phase.RECONNECTING
            await sleep_or_stop(stop, delay)

    def _failed(self, exc: Exception, reason: str, message: str) -> None:
        self.last_error = str(exc)
        self.metrics.reconnects.labels(reason).inc()
        if reason == "connection" or reason == "slot-in-use":
            log.warning(message, exc)
        else:
            log.error(message, exc)

    async def _session(self, term: Term, stop: asyncio.Event, catch_up: bool) -> None:
        self._stream_started = False
        repl = await ReplicationConnection.connect(
            self.conninfo,
            clock=self.clock,
            application_name=f"mission-runner {self.options.instance}".strip()[:63],
        )
        try:
            async with self.pool.connection() as conn:
                await slots.ensure_publication(conn, self.options.publication)
                slot = await slots.get_slot(conn, self.options.slot)
            start = await self._prepare_slot(repl, slot, term)
            options = StreamOptions(
                slot=self.options.slot,
                publication=self.options.publication,
                proto_version=2 if repl.server_version >= 140000 else 1,
                streaming=self.options.streaming,
                status_interval=self.options.status_interval,
                compiled=self.options.compiled,
            )
            self.replication = repl
            caught_up = asyncio.ensure_future(self._catch_up(term, stop, catch_up))
            try:
                await repl.stream(start, self, options, on_started=self._on_started, stop=stop)
            except ReplicationError as exc:
                raise await self.resolve(exc) from exc
            finally:
                if not caught_up.done():
                    caught_up.cancel()
                await asyncio.gather(caught_up, return_exceptions=True)
                term.set_dispatching(False)
                self.streaming.clear()
                self.metrics.streaming.set(0)
            if not caught_up.cancelled() and (failed := caught_up.exception()) is not None:
                raise failed
            # Stopped on request: persist what is applied and confirm it before closing,
            # within a bound (the database may be gone: then nothing more is confirmed).
            try:
                async with asyncio.timeout(FINAL_PERSIST_TIMEOUT):
                    lsn = await self.ingest.persist(term.fence)
                    if lsn is not None:
                        repl.confirm(lsn)
                    await repl.send_status()
            except (
                TimeoutError,
                psycopg.Error,
                OSError,
                ConnectionLostError,
                FencedError,
                PersistenceError,
            ) as exc:
                log.warning("final persist before stopping did not complete: %s", exc)
        finally:
            self.replication = None
            await repl.close()

    async def resolve(self, exc: ReplicationError) -> ReplicationError:
        """A replication error the SQLSTATE alone does not settle: read the slot's state."""
        if type(exc) is not ReplicationError:
            return exc
        async with self.pool.connection() as conn:
            slot = await slots.get_slot(conn, self.options.slot)
        if slot is None or slot.lost:
            state = "missing" if slot is None else f"wal_status {slot.wal_status}"
            return SlotLostError(f"{exc} (slot {state})", slot=self.options.slot)
        return exc

    def _on_started(self) -> None:
        self._stream_started = True
        self.phase = Phase.STREAMING
        self.last_error = None
        self.streaming.set()
        self.metrics.streaming.set(1)

    async def _catch_up(self, term: Term, stop: asyncio.Event, catch_up: bool) -> None:
        """Once everything committed before this session is applied, let the runtime
        dispatch (and in catch-up mode, once it is also persisted, stop). A failure in
        catch-up mode stops the session and is raised by it."""
        await wait_first(self.streaming)
        attempt = 0
        while True:
            try:
                await self.sync_point(persisted=catch_up)
                break
            except (psycopg.Error, OSError) as exc:
                if catch_up or not pgerrors.transient(exc):
                    stop.set()
                    raise
                attempt += 1
                log.warning("waiting for the stream to catch up failed: %s; retrying", exc)
                if await sleep_or_stop(stop, self.options.reconnect.delay(attempt)):
                    return
            except BaseException:
                stop.set()
                raise
        if catch_up:
            self.caught_up = True
            stop.set()
        else:
            term.set_dispatching(True)

    # -- the sink the replication connection calls ----------------------------------------

    def on_transaction(self, tx: CommittedTransaction) -> bool:
        for msg in tx.messages:
            if msg.prefix == CATCHUP_PREFIX:
                waiter = self._markers.pop(msg.content.decode("ascii", "replace"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(tx.end_lsn)
        return self.ingest.apply(tx)

    async def finish(self) -> None:
        await self.ingest.finish()

    def on_logical_message(self, msg: LogicalMessage) -> None:
        """Non-transactional messages carry nothing for us."""

    def on_keepalive(self, wal_end: Lsn) -> bool:
        return self.ingest.idle_position(wal_end)

    # -- group commit and heartbeat -------------------------------------------------------

    async def _persister(self, term: Term, stop: asyncio.Event) -> None:
        """Group commits when they are due; confirms what each returns. A refused fence ends
        the term (LeadershipLost); a non-transient error propagates (PersistenceError)."""
        ingest = self.ingest
        while not stop.is_set():
            deadline = ingest.persist_deadline()
            wait = None if deadline is None else deadline - self.clock.monotonic()
            if wait is None or wait > 0:
                await wait_first(stop, ingest.persist_wanted, within=wait)
                ingest.persist_wanted.clear()
                continue
            try:
                lsn = await ingest.persist(term.fence, stop)
            except Stopped:
                return
            except FencedError as exc:
                raise LeadershipLost(str(exc)) from exc
            except PersistenceError:
                raise
            repl = self.replication
            if lsn is not None and repl is not None:
                repl.confirm(lsn)

    async def _heartbeat(self) -> None:
        """A transactional message keeps a quiet sync_changes from pinning WAL."""
        interval = self.options.heartbeat_interval
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
            term = self.term
            while self.ingest.persisted_lsn < lsn:
                if term is None:
                    raise LeadershipLost("the term ended before the sync point was persisted")
                try:
                    confirmed = await self.ingest.persist(term.fence)
                except FencedError as exc:
                    raise LeadershipLost(str(exc)) from exc
                repl = self.replication
                if confirmed is not None and repl is not None:
                    repl.confirm(confirmed)
                if self.ingest.persisted_lsn < lsn:
                    await asyncio.sleep(0.01)
        return lsn

    # -- slots ----------------------------------------------------------------------------

    async def _prepare_slot(
        self, repl: ReplicationConnection, slot: slots.SlotInfo | None, term: Term
    ) -> Lsn:
        """Decide where to stream from; create (and load) the slot when needed."""
        name = self.options.slot
        checkpoint = self.ingest.persisted
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
        await self.lock.check()  # never touch the slot of another leader
        if slot is not None:
            async with self.pool.connection() as conn:
                await slots.drop_slot(conn, name)
        return await self._create_and_load(repl, term)

    async def _create_and_load(self, repl: ReplicationConnection, term: Term) -> Lsn:
        self.phase = Phase.LOADING
        created = await repl.create_slot(self.options.slot, export_snapshot=True)
        log.info(
            "created slot %s at %s; loading sync_changes in its snapshot",
            created.name,
            created.consistent_point,
        )
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        try:
            await self.ingest.load(
                conn, snapshot_name=created.snapshot_name, lsn=created.consistent_point
            )
        finally:
            await conn.close()
        try:
            await self.ingest.persist(term.fence)
        except FencedError as exc:
            raise LeadershipLost(str(exc)) from exc
        return created.consistent_point
