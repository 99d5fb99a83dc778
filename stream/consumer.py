"""The replication connection: the only code that touches the replication socket.

It runs replication commands (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT) through psycopg and
then drives the COPY_BOTH stream directly on `psycopg.pq`: frames in through the sans-IO frame
codec, pgoutput decoder and transaction assembler (chained by `stream.reader.FrameReader`),
committed transactions out to a sink; standby status updates back.

Invariants:
- Only positions the sink has made durable are confirmed as flushed (`confirm()`); the sink
  calls it after its snapshots and checkpoint are committed.
- A keepalive's WAL end is offered to the sink as an idle position only when nothing received
  is waiting: no open (or buffered streamed) transaction here, and nothing applied but
  unpersisted in the sink.
- Status updates go out on their own timer, checked inside the data path too, so a flood of
  data never starves them; a keepalive that asks for a reply, and a position the sink has
  just confirmed, go out within `_FRAMES_PER_YIELD` frames.
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
from stream.errors import ConnectionLostError, ReplicationError, SlotInUseError, SlotLostError
from stream.frames import PrimaryKeepalive, encode_status_update
from stream.messages import LogicalMessage
from stream.reader import FrameReader
from stream.transactions import CommittedTransaction

log = logging.getLogger(__name__)

# Frames handled before yielding to the event loop, so other tasks (persister, HTTP) run.
_FRAMES_PER_YIELD = 2000


class StreamSink(Protocol):
    """Receives what the stream delivers. Called synchronously from the stream loop."""

    def on_transaction(self, tx: CommittedTransaction) -> None: ...

    def on_logical_message(self, msg: LogicalMessage) -> None: ...

    def on_idle_position(self, lsn: Lsn) -> None:
        """The server has sent everything before `lsn` and none of it is pending."""
        ...

    def is_idle(self) -> bool:
        """True when nothing applied is waiting to be persisted."""
        ...


@dataclass(frozen=True, slots=True)
class StreamOptions:
    slot: str
    publication: str
    proto_version: int = 2
    streaming: bool = True
    messages: bool = True
    status_interval: float = 10.0
    # The compiled frame loop for plain Inserts, when built (see stream/reader.py); False:
    # the Python paths alone (same results, lower throughput).
    compiled: bool = True

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
class SystemIdentity:
    system_id: str
    timeline: int
    xlogpos: Lsn
    dbname: str | None


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


def _translate_result_error(res: pq.abc.PGresult, slot: str) -> ReplicationError:
    sqlstate = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    message = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(
        "utf-8", "replace"
    )
    detail = (res.error_field(pq.DiagnosticField.MESSAGE_DETAIL) or b"").decode("utf-8", "replace")
    text = f"{message} ({sqlstate})" + (f": {detail}" if detail else "")
    if sqlstate == "55006":
        return SlotInUseError(text, slot=slot, hint="another instance is streaming from it")
    if sqlstate == "42704" and "slot" in message:
        return SlotLostError(text, slot=slot)
    if sqlstate in {"55000", "58P01"} and (
        "invalidated" in detail or "invalidated" in message or "removed" in message
    ):
        return SlotLostError(text, slot=slot)
    if sqlstate.startswith("08") or sqlstate.startswith("57"):
        return ConnectionLostError(text, slot=slot)
    return ReplicationError(text, slot=slot)


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

    async def identify_system(self) -> SystemIdentity:
        cur = await self._conn.execute("IDENTIFY_SYSTEM")
        row = await cur.fetchone()
        assert row is not None
        return SystemIdentity(
            system_id=str(row[0]),
            timeline=int(str(row[1])),
            xlogpos=Lsn.parse(str(row[2])),
            dbname=None if row[3] is None else str(row[3]),
        )

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
            raise ReplicationError(f"replication slot {name!r} already exists", slot=name) from exc
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
            raise _translate_result_error(res, options.slot)
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
        pgconn = self._conn.pgconn
        get_copy_data = pgconn.get_copy_data
        reader = FrameReader(options.proto_version, compiled=options.compiled)
        pump = reader.pump
        feed = reader.feed
        stats = self.stats
        clock = self._clock
        interval = options.status_interval
        next_status = clock.monotonic() + interval
        while True:
            if stop is not None and stop.is_set():
                await self._send_status(wake)
                return
            wake.clear()
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                raise ConnectionLostError(f"replication connection lost: {exc}") from exc
            handled = 0
            reply_now = False
            drained = False
            # The data path. `pump` takes the plain Inserts in C, as many as come in a row,
            # and hands back the first other frame, which goes through `feed`; the loop
            # keeps to locals. The received position lives in the reader and reaches `stats`
            # before anything else can read it (a sink call, an await).
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
                        # libpq's buffer is empty: read the socket once more before paying
                        # for a trip through the event loop. Fairness does not suffer: the
                        # loop still yields every _FRAMES_PER_YIELD frames.
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
                            sink.on_transaction(out)
                        elif isinstance(out, PrimaryKeepalive):
                            stats.keepalives += 1
                            stats.last_server_time_us = out.send_time_us
                            # Invariant: only when nothing received is pending anywhere.
                            if not reader.in_transaction and sink.is_idle():
                                sink.on_idle_position(out.wal_end)
                            if out.reply_requested:
                                reply_now = True
                        else:
                            sink.on_logical_message(out)
                elif rest is not None:  # no frame: 0 none buffered, < 0 the copy ended
                    if rest == 0:
                        break
                    res = pgconn.get_result()
                    if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
                        raise _translate_result_error(res, options.slot)
                    raise ConnectionLostError("the server ended the replication stream")
                if handled % _FRAMES_PER_YIELD == 0:
                    self._note_received(reader)
                    if reply_now or self._status_due or clock.monotonic() >= next_status:
                        await self._send_status(wake)
                        next_status = clock.monotonic() + interval
                        reply_now = False
                    await asyncio.sleep(0)
            self._note_received(reader)
            now = clock.monotonic()
            if reply_now or self._status_due or now >= next_status:
                await self._send_status(wake)
                next_status = clock.monotonic() + interval
                now = clock.monotonic()
            if handled and not wake.is_set():
                # More may have arrived while we were busy; poll once more before sleeping.
                wake.set()
                await asyncio.sleep(0)
                continue
            try:
                async with asyncio.timeout(max(0.0, next_status - now)):
                    await wake.wait()
            except TimeoutError:
                pass

    def _note_received(self, reader: FrameReader) -> None:
        """Bring `stats.received_lsn` up to what the reader has seen."""
        received = reader.received_lsn
        if received > self.stats.received_lsn:
            self.stats.received_lsn = received
