"""The replication connection: the only code that touches the replication socket.

It runs replication commands (CREATE_REPLICATION_SLOT) through psycopg and then drives the
COPY_BOTH stream directly on `psycopg.pq`: frames in through the sans-IO frame codec,
pgoutput decoder and transaction assembler (chained by `stream.reader.FrameReader`),
committed transactions out to a sink; standby status updates back.

The data path goes one way: the stream hands transactions to the sink; the sink never calls
back into the connection. What may be confirmed comes back as values: the sink's answer to
a keepalive (`StreamSink.on_keepalive`), and `confirm()`, which the connection's owner calls
with the position a group commit returned.

Invariants:
- Only positions the owner has made durable are confirmed as flushed (`confirm()`).
- A keepalive's WAL end is offered to the sink only when nothing received is waiting here:
  no open (or buffered streamed) transaction; the sink adds that nothing applied is
  unpersisted.
- Status updates go out on their own timer (`StatusTimer`), checked inside the data path
  too, so a flood of data never starves them; a keepalive that asks for a reply, and a
  newly confirmed position, go out within `_FRAMES_PER_YIELD` frames.
- Errors are classified by SQLSTATE: 55006 (the slot is active elsewhere) is
  `SlotInUseError`; classes 08 and 57P0x are `ConnectionLostError`; anything else is a
  `ReplicationError` carrying its SQLSTATE, which the supervisor resolves by reading the
  slot's state from the server (missing or invalidated: rebuild).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import psycopg
from psycopg import pq

from core.clock import Clock
from core.lsn import ZERO, Lsn
from stream.errors import ConnectionLostError, ReplicationError, SlotInUseError
from stream.frames import PrimaryKeepalive, encode_status_update
from stream.messages import LogicalMessage
from stream.reader import FrameReader
from stream.transactions import CommittedTransaction

log = logging.getLogger(__name__)

# Frames handled before yielding to the event loop, so other tasks (persister, HTTP) run.
_FRAMES_PER_YIELD = 2000


class StreamSink(Protocol):
    """Receives what the stream delivers, synchronously from the stream loop."""

    def on_transaction(self, tx: CommittedTransaction) -> bool:
        """Take a committed transaction. False: it is large and not yet fully applied; the
        stream awaits `finish()` before it reads on."""
        ...

    async def finish(self) -> None:
        """Apply the rest of the transaction `on_transaction` took, yielding in between."""
        ...

    def on_logical_message(self, msg: LogicalMessage) -> None: ...

    def on_keepalive(self, wal_end: Lsn) -> bool:
        """The server has sent everything before `wal_end` and no transaction is open: True
        when nothing is pending in the sink either, so `wal_end` may be confirmed."""
        ...


@dataclass(frozen=True, slots=True)
class StreamOptions:
    slot: str
    publication: str
    proto_version: int = 2
    streaming: bool = True
    messages: bool = True
    status_interval: float = 10.0
    compiled: bool = True
    """Use the compiled frame path when it is built (see stream/reader.py)."""

    def start_command(self, start: Lsn) -> bytes:
        opts = [
            f"proto_version '{self.proto_version}'",
            f"publication_names '\"{self.publication}\"'",
        ]
        if self.messages:
            opts.append("messages 'true'")
        if self.streaming and self.proto_version >= 2:
            opts.append("streaming 'on'")
        return (
            f'START_REPLICATION SLOT "{self.slot}" LOGICAL {start} ({", ".join(opts)})'
        ).encode()


@dataclass(frozen=True, slots=True)
class CreatedSlot:
    name: str
    consistent_point: Lsn
    snapshot_name: str | None


@dataclass(slots=True)
class StreamStats:
    """Counters of the current session, read by status and metrics."""

    frames: int = 0
    bytes: int = 0
    transactions: int = 0
    keepalives: int = 0
    status_updates: int = 0
    received_lsn: Lsn = ZERO
    flushed_lsn: Lsn = ZERO
    last_server_time_us: int = 0
    last_message_at: float = 0.0
    """Monotonic time the server last sent anything (data or keepalive)."""


class StatusTimer:
    """When the next standby status update is due. Pure: time (monotonic) is passed in."""

    __slots__ = ("interval", "next_at")

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.next_at = now + interval

    def due(self, now: float, *, urgent: bool) -> bool:
        """`urgent`: the server asked for a reply, or a new position was confirmed."""
        return urgent or now >= self.next_at

    def sent(self, now: float) -> None:
        self.next_at = now + self.interval

    def wait(self, now: float) -> float:
        """Seconds until an update is due on the timer alone."""
        return max(0.0, self.next_at - now)


def classify_result_error(res: pq.abc.PGresult, slot: str) -> ReplicationError:
    """The error of a failed replication command or stream, by its SQLSTATE."""
    sqlstate = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode() or None
    message = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(
        "utf-8", "replace"
    )
    detail = (res.error_field(pq.DiagnosticField.MESSAGE_DETAIL) or b"").decode("utf-8", "replace")
    text = f"{message} ({sqlstate})" + (f": {detail}" if detail else "")
    if sqlstate == "55006":
        return SlotInUseError(text, slot=slot, sqlstate=sqlstate)
    if sqlstate is None or sqlstate.startswith("08") or sqlstate in {"57P01", "57P02", "57P03"}:
        return ConnectionLostError(text, slot=slot, sqlstate=sqlstate)
    return ReplicationError(text, slot=slot, sqlstate=sqlstate)


class ReplicationConnection:
    """One replication connection (`replication=database`)."""

    def __init__(self, conn: psycopg.AsyncConnection[tuple[object, ...]], *, clock: Clock) -> None:
        self._conn = conn
        self._clock = clock
        self._flushed = Lsn(0)
        self._status_due = False
        self._wake: asyncio.Event | None = None
        self.stats = StreamStats()

    @classmethod
    async def connect(
        cls, conninfo: str, *, clock: Clock, application_name: str = "mission-runner"
    ) -> ReplicationConnection:
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo,
                autocommit=True,
                replication="database",
                application_name=application_name,
                options="-c timezone=UTC -c datestyle=ISO",
            )
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(f"cannot open the replication connection: {exc}") from exc
        return cls(conn, clock=clock)

    @property
    def server_version(self) -> int:
        return self._conn.info.server_version

    @property
    def backend_pid(self) -> int:
        return self._conn.info.backend_pid

    async def close(self) -> None:
        await self._conn.close()

    async def create_slot(self, name: str, *, export_snapshot: bool) -> CreatedSlot:
        """Create a pgoutput slot. With `export_snapshot`, the snapshot stays valid until the
        next command on this connection: read the table in it, then `stream()`."""
        if self.server_version >= 150000:
            snapshot = "'export'" if export_snapshot else "'nothing'"
            cmd = f'CREATE_REPLICATION_SLOT "{name}" LOGICAL pgoutput (SNAPSHOT {snapshot})'
        else:
            snapshot = "EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT"
            cmd = f'CREATE_REPLICATION_SLOT "{name}" LOGICAL pgoutput {snapshot}'
        try:
            cur = await self._conn.execute(cmd.encode())
        except psycopg.errors.DuplicateObject as exc:
            raise ReplicationError(
                f"replication slot {name!r} already exists", slot=name, sqlstate=exc.sqlstate
            ) from exc
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(f"creating slot {name!r}: {exc}", slot=name) from exc
        row = await cur.fetchone()
        assert row is not None
        return CreatedSlot(
            name=str(row[0]),
            consistent_point=Lsn.parse(str(row[1])),
            snapshot_name=None if row[2] is None else str(row[2]),
        )

    # -- the stream ---------------------------------------------------------------------

    def confirm(self, lsn: Lsn) -> None:
        """Everything up to `lsn` is durable on our side: report it as flushed, soon."""
        if lsn > self._flushed:
            self._flushed = lsn
            self.stats.flushed_lsn = lsn
            self._status_due = True
            if self._wake is not None:
                self._wake.set()

    async def stream(
        self,
        start: Lsn,
        sink: StreamSink,
        options: StreamOptions,
        *,
        on_started: Callable[[], None] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Run START_REPLICATION from `start` until `stop` is set or the stream fails."""
        pgconn = self._conn.pgconn
        pgconn.nonblocking = 1
        self._flushed = max(self._flushed, start)
        self.stats.flushed_lsn = self._flushed
        self.stats.received_lsn = max(self.stats.received_lsn, start)
        loop = asyncio.get_running_loop()
        wake = self._wake = asyncio.Event()
        fd = pgconn.socket
        loop.add_reader(fd, wake.set)
        stop_task: asyncio.Task[Literal[True]] | None = None
        if stop is not None:
            stop_task = asyncio.ensure_future(stop.wait())
            stop_task.add_done_callback(lambda _f: wake.set())
        try:
            await self._start(start, options, wake)
            self.stats.last_message_at = self._clock.monotonic()
            if on_started is not None:
                on_started()
            await self._run(sink, options, wake, stop)
        finally:
            loop.remove_reader(fd)
            try:
                loop.remove_writer(fd)
            except (ValueError, OSError):
                pass
            if stop_task is not None:
                stop_task.cancel()
            self._wake = None

    async def _start(self, start: Lsn, options: StreamOptions, wake: asyncio.Event) -> None:
        pgconn = self._conn.pgconn
        try:
            pgconn.send_query(options.start_command(start))
            await self._flush_output(wake)
            while True:
                pgconn.consume_input()
                if not pgconn.is_busy():
                    break
                wake.clear()
                await wake.wait()
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(
                f"START_REPLICATION failed: {exc}", slot=options.slot
            ) from exc
        res = pgconn.get_result()
        if res is None:
            raise ConnectionLostError("START_REPLICATION returned no result", slot=options.slot)
        if res.status != pq.ExecStatus.COPY_BOTH:
            # Drain the remaining results so the connection stays usable for close().
            while pgconn.get_result() is not None:
                pass
            raise classify_result_error(res, options.slot)
        log.info("streaming from slot %s at %s", options.slot, start)

    async def send_status(self) -> None:
        """Send a status update now; also valid after `stream()` returned on request, while
        the copy is still open (the final confirmation before closing)."""
        await self._send_status(asyncio.Event())

    async def _flush_output(self, wake: asyncio.Event) -> None:
        pgconn = self._conn.pgconn
        loop = asyncio.get_running_loop()
        while pgconn.flush() == 1:
            loop.add_writer(pgconn.socket, wake.set)
            try:
                wake.clear()
                await wake.wait()
            finally:
                loop.remove_writer(pgconn.socket)

    async def _send_status(self, wake: asyncio.Event, *, reply: bool = False) -> None:
        stats = self.stats
        write = max(stats.received_lsn, self._flushed)
        msg = encode_status_update(
            write=write,
            flush=self._flushed,
            apply=self._flushed,
            now_us=self._clock.now_us(),
            reply_requested=reply,
        )
        pgconn = self._conn.pgconn
        try:
            while pgconn.put_copy_data(msg) == 0:
                await self._flush_output(wake)
            await self._flush_output(wake)
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(f"sending a status update failed: {exc}") from exc
        stats.status_updates += 1
        self._status_due = False

    async def _run(
        self,
        sink: StreamSink,
        options: StreamOptions,
        wake: asyncio.Event,
        stop: asyncio.Event | None,
    ) -> None:
        """The outer loop: read what arrived, send status updates when due, sleep until the
        socket is readable or the next update is due."""
        pgconn = self._conn.pgconn
        reader = FrameReader(options.proto_version, compiled=options.compiled)
        clock = self._clock
        timer = StatusTimer(options.status_interval, clock.monotonic())
        while True:
            if stop is not None and stop.is_set():
                await self._send_status(wake)
                return
            wake.clear()
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                raise ConnectionLostError(f"replication connection lost: {exc}") from exc
            handled, reply = await self._drain(reader, sink, options, wake, timer)
            now = clock.monotonic()
            if timer.due(now, urgent=reply or self._status_due):
                await self._send_status(wake)
                timer.sent(clock.monotonic())
                now = clock.monotonic()
            if handled and not wake.is_set():
                # More may have arrived while we were busy; poll once more before sleeping.
                wake.set()
                await asyncio.sleep(0)
                continue
            try:
                async with asyncio.timeout(timer.wait(now)):
                    await wake.wait()
            except TimeoutError:
                pass

    async def _drain(
        self,
        reader: FrameReader,
        sink: StreamSink,
        options: StreamOptions,
        wake: asyncio.Event,
        timer: StatusTimer,
    ) -> tuple[int, bool]:
        """The data path: every frame libpq has buffered, and what the socket has on top.
        `pump` takes the plain Inserts in C, as many as come in a row, and hands back the
        first other frame, which goes through `feed`; the loop keeps to locals. The received
        position lives in the reader and reaches `stats` before anything else can read it
        (a sink call, an await). Returns (frames handled, a reply was requested)."""
        pgconn = self._conn.pgconn
        get_copy_data = pgconn.get_copy_data
        pump, feed = reader.pump, reader.feed
        stats, clock = self.stats, self._clock
        handled = 0
        reply = False
        drained = False
        while True:
            try:
                taken, taken_bytes, rest = pump(
                    get_copy_data, _FRAMES_PER_YIELD - handled % _FRAMES_PER_YIELD
                )
                if taken:
                    drained = False
                    handled += taken
                    stats.frames += taken
                    stats.bytes += taken_bytes
                if rest == 0 and not drained:
                    # libpq's buffer is empty: read the socket once more before paying for a
                    # trip through the event loop. Fairness does not suffer: the loop still
                    # yields every _FRAMES_PER_YIELD frames.
                    drained = True
                    pgconn.consume_input()
                    continue
            except psycopg.OperationalError as exc:
                raise ConnectionLostError(f"replication stream failed: {exc}") from exc
            if isinstance(rest, bytes):
                drained = False
                stats.frames += 1
                stats.bytes += len(rest)
                out = feed(rest)
                handled += 1
                if out is not None:
                    self._note_received(reader)
                    if isinstance(out, CommittedTransaction):
                        stats.transactions += 1
                        if not sink.on_transaction(out):
                            await sink.finish()
                    elif isinstance(out, PrimaryKeepalive):
                        stats.keepalives += 1
                        stats.last_server_time_us = out.send_time_us
                        # Invariant: only when nothing received is pending anywhere.
                        if not reader.in_transaction and sink.on_keepalive(out.wal_end):
                            self.confirm(out.wal_end)
                        reply = reply or out.reply_requested
                    else:
                        sink.on_logical_message(out)
            elif rest is not None:  # no frame: 0 none buffered, < 0 the copy ended
                if rest == 0:
                    break
                res = pgconn.get_result()
                if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
                    raise classify_result_error(res, options.slot)
                raise ConnectionLostError("the server ended the replication stream")
            if handled % _FRAMES_PER_YIELD == 0:
                self._note_received(reader)
                if timer.due(clock.monotonic(), urgent=reply or self._status_due):
                    await self._send_status(wake)
                    timer.sent(clock.monotonic())
                    reply = False
                await asyncio.sleep(0)
        self._note_received(reader)
        if handled:
            stats.last_message_at = clock.monotonic()
        return handled, reply

    def _note_received(self, reader: FrameReader) -> None:
        """Bring `stats.received_lsn` up to what the reader has seen."""
        received = reader.received_lsn
        if received > self.stats.received_lsn:
            self.stats.received_lsn = received
