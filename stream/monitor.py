"""Replication lag, read from the server on a timer, into the gauges and the status API.

Each sample reads the server's WAL position and the slot's state (`pg_replication_slots`,
which works with no consumer connected) and feeds the supervisor's lag tracker; the lag
itself is defined once, in `stream.lag`. Readiness (`ready`) combines it with the stream's
liveness.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool

from core.aio import sleep_or_stop
from core.clock import Clock
from stream import lag, slots
from stream.metrics import LagMetrics
from stream.supervisor import Supervisor

log = logging.getLogger(__name__)

WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]]


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One sample, for the status page's charts."""

    at_us: int
    lag_bytes: int | None
    lag_seconds: float | None
    rows: int
    transactions: int


class LagMonitor:
    def __init__(
        self,
        *,
        supervisor: Supervisor,
        pool: Pool,
        clock: Clock,
        metrics: LagMetrics,
        slot: str,
        interval: float = 5.0,
        max_silence: float = 60.0,
    ) -> None:
        self.supervisor = supervisor
        self.pool = pool
        self.clock = clock
        self.metrics = metrics
        self.slot = slot
        self.interval = interval
        self.max_silence = max_silence
        self.last: slots.SlotLag | None = None
        self.history: deque[HistoryPoint] = deque(maxlen=180)

    def lag_seconds(self) -> float | None:
        """Seconds the snapshots may be behind the server (see `stream.lag`)."""
        ingest = self.supervisor.ingest
        return self.supervisor.lag.seconds(
            ingest.applied_lsn, ingest.applied_commit_time_us, self.clock.now_us()
        )

    def stuck(self) -> bool:
        """The server's WAL grew past what we received and the stream is silent."""
        repl = self.supervisor.replication
        sample = self.supervisor.lag.last
        if repl is None or sample is None:
            return False
        return lag.stuck(
            server_lsn=sample.lsn,
            received=repl.stats.received_lsn,
            silent_for=self.clock.monotonic() - repl.stats.last_message_at,
            max_silence=self.max_silence,
        )

    def ready(self, max_lag: float) -> tuple[bool, str]:
        """Ready: leads and holds the stream, lags less than `max_lag` seconds, and the
        stream moves while the server's WAL grows."""
        sup = self.supervisor
        if not sup.streaming.is_set():
            why = f"waiting for {sup.lock.waiting_on}" if sup.lock.waiting_on else str(sup.phase)
            return False, f"not streaming ({why})"
        seconds = self.lag_seconds()
        if seconds is None:
            return False, "lag unknown (no sample of the server's WAL yet)"
        if seconds > max_lag:
            return False, f"lag {seconds:.1f} s exceeds {max_lag:g} s"
        if self.stuck():
            return False, (
                f"the stream has been silent for more than {self.max_silence:g} s"
                " while the server's WAL grew"
            )
        return True, "streaming"

    async def sample(self) -> slots.SlotLag | None:
        now = self.clock.now_us()
        async with self.pool.connection() as conn:
            lag_now = await slots.slot_lag(conn, self.slot)
            current = lag_now.current_lsn if lag_now else await slots.current_wal_lsn(conn)
        self.supervisor.lag.sample(current, now)
        m = self.metrics
        if lag_now is not None:
            m.lag_bytes.set(lag_now.lag_bytes or 0)
            m.retained_wal_bytes.set(lag_now.retained_bytes or 0)
            m.safe_wal_bytes.set(-1 if lag_now.safe_wal_size is None else lag_now.safe_wal_size)
            for status in WAL_STATUSES:
                m.wal_status.labels(status).set(1 if lag_now.wal_status == status else 0)
            m.spill_bytes.set(lag_now.spill_bytes or 0)
            m.stream_bytes.set(lag_now.stream_bytes or 0)
        seconds = self.lag_seconds()
        if seconds is not None:
            m.lag_seconds.set(seconds)
        ingest = self.supervisor.ingest
        self.history.append(
            HistoryPoint(
                now,
                lag_now.lag_bytes if lag_now else None,
                seconds,
                ingest.rows_applied,
                ingest.transactions_applied,
            )
        )
        self.last = lag_now
        return lag_now

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sample()
            except (psycopg.Error, OSError) as exc:
                log.warning("reading slot lag failed: %s", exc)
            if await sleep_or_stop(stop, self.interval):
                return
