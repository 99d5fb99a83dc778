"""Replication lag, read from the slot on a timer, into the gauges and the status API.

Lag in bytes is the server's WAL position minus the slot's confirmed flush position. Lag in
seconds is how stale our view may be: we sample the server's WAL position with the time;
once everything up to a sample is applied (or confirmed idle), we were current as of that
sample's time. With every sample passed, the lag is 0 (caught up and idle).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool

from core.clock import Clock
from core.lsn import Lsn
from mission_runner.ingest import Ingestor
from mission_runner.metrics import Metrics
from stream import slots

log = logging.getLogger(__name__)

WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")


@dataclass(slots=True)
class LagSample:
    at_us: int
    lag: slots.SlotLag | None


class LagMonitor:
    def __init__(
        self,
        *,
        ingestor: Ingestor,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]],
        clock: Clock,
        metrics: Metrics,
        slot: str,
        interval: float = 5.0,
    ) -> None:
        self.ingestor = ingestor
        self.pool = pool
        self.clock = clock
        self.metrics = metrics
        self.slot = slot
        self.interval = interval
        self.last: LagSample | None = None
        self.history: deque[tuple[int, int | None, float, int, int]] = deque(maxlen=180)
        self._pending: deque[tuple[Lsn, int]] = deque()
        self._current_as_of: int | None = None
        self._last_rows = 0
        self._last_tx = 0

    def lag_seconds(self) -> float:
        """Seconds our snapshots may be behind the server (0: caught up and idle)."""
        applied = self.ingestor.projector.applied_lsn
        while self._pending and self._pending[0][0] <= applied:
            self._current_as_of = self._pending.popleft()[1]
        if not self._pending:
            return 0.0
        since = self._current_as_of if self._current_as_of is not None else self._pending[0][1]
        return max(0.0, (self.clock.now_us() - since) / 1_000_000)

    async def sample(self) -> LagSample:
        now = self.clock.now_us()
        async with self.pool.connection() as conn:
            lag = await slots.slot_lag(conn, self.slot)
        if lag is not None:
            self._pending.append((lag.current_lsn, now))
            if len(self._pending) > 10_000:
                self._pending.popleft()
        m = self.metrics
        if lag is not None:
            m.lag_bytes.set(lag.lag_bytes or 0)
            m.retained_wal_bytes.set(lag.retained_bytes or 0)
            m.safe_wal_bytes.set(-1 if lag.safe_wal_size is None else lag.safe_wal_size)
            for status in WAL_STATUSES:
                m.wal_status.labels(status).set(1 if lag.wal_status == status else 0)
            m.spill_bytes.set(lag.spill_bytes or 0)
            m.stream_bytes.set(lag.stream_bytes or 0)
        seconds = self.lag_seconds()
        m.lag_seconds.set(seconds)
        # (time, lag bytes, lag seconds, rows applied, transactions applied) for the page.
        self.history.append(
            (
                now,
                lag.lag_bytes if lag else None,
                seconds,
                self.ingestor.rows_applied,
                self.ingestor.transactions_applied,
            )
        )
        self.last = LagSample(now, lag)
        return self.last

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sample()
            except psycopg.Error as exc:
                log.warning("reading slot lag failed: %s", exc)
            try:
                async with asyncio.timeout(self.interval):
                    await stop.wait()
            except TimeoutError:
                pass
