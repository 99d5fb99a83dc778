"""One active instance per slot: a session-level advisory lock on a dedicated connection.

A second instance (a rolling deploy, a stuck pod) waits on the lock instead of fighting over
the slot, and is not ready meanwhile. The server releases the lock the moment the holder's
session ends, so a waiter blocked in `pg_advisory_lock` takes over within a second of the
holder dying. The slot itself is the second guard: only one walsender can use it.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg

from stream.errors import ConnectionLostError, LeadershipLost

log = logging.getLogger(__name__)

_KEY = "hashtextextended('mission_runner:' || %s, 0)"


class LeaderLock:
    def __init__(self, *, conninfo: str, slot: str, check_interval: float = 2.0) -> None:
        self.conninfo = conninfo
        self.slot = slot
        self.check_interval = check_interval
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        try:
            return await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, application_name="mission-runner leader"
            )
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(f"cannot open the leader-lock connection: {exc}") from exc

    async def holder(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> str:
        cur = await conn.execute(
            "SELECT a.pid, coalesce(a.client_addr::text, 'local'), a.backend_start"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND ((l.classid::bigint << 32) | l.objid::bigint) = " + _KEY,
            (self.slot,),
        )
        row = await cur.fetchone()
        if row is None:
            return "another instance"
        return f"backend PID {row[0]} ({row[1]}, since {row[2]})"

    async def try_acquire(self) -> bool:
        conn = await self._connect()
        cur = await conn.execute("SELECT pg_try_advisory_lock(" + _KEY + ")", (self.slot,))
        row = await cur.fetchone()
        if row is not None and row[0]:
            self._conn = conn
            return True
        await conn.close()
        return False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait for the lock (blocking on the server, no polling); False if `stop` came first."""
        if await self.try_acquire():
            return True
        conn = await self._connect()
        log.warning(
            "another instance is active for slot %s (%s); waiting to take over",
            self.slot,
            await self.holder(conn),
        )
        waiting = asyncio.ensure_future(
            conn.execute("SELECT pg_advisory_lock(" + _KEY + ")", (self.slot,))
        )
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
            self._conn = conn
            log.info("took over slot %s: this instance is now active", self.slot)
            return True
        waiting.cancel()
        try:
            await waiting
        except (asyncio.CancelledError, psycopg.Error):
            pass
        await conn.close()
        if waiting.done() and not waiting.cancelled() and waiting.exception() is not None:
            raise ConnectionLostError(f"waiting for the leader lock failed: {waiting.exception()}")
        return False

    async def watch(self) -> None:
        """Return only by raising LeadershipLost when the lock's session is gone."""
        while True:
            await asyncio.sleep(self.check_interval)
            conn = self._conn
            if conn is None:
                raise LeadershipLost("the leader lock is not held")
            try:
                await conn.execute("SELECT 1")
            except psycopg.Error as exc:
                raise LeadershipLost(f"the leader-lock connection broke: {exc}") from exc

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()
