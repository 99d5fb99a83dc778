"""One active instance per slot: a session-level advisory lock on a dedicated connection.

A second instance (a rolling deploy, a stuck pod) waits on the lock instead of fighting over
the slot, and is not ready meanwhile. The server releases the lock the moment the holder's
session ends, so a waiter blocked in `pg_advisory_lock` takes over within a second of the
holder's session ending. The slot itself is a second guard (one walsender per slot), and the
fencing token (`writer.fence`) a third: the lock says who *should* lead, the token refuses
the writes of an instance that does not know yet that it was deposed.

The holder must notice quickly when its session is gone (an idle connection killed by a
NAT or proxy timeout, a server restart): the connection has TCP keepalives, and `watch`
asks the server every `check_interval` whether this session still holds the lock, with a
deadline, so a connection that hangs counts as lost too.

Connecting is retried with the backoff policy: a database restart or an outage is
transient; the instance waits (not ready) and takes the lock again when the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import NoReturn

import psycopg

from core.aio import Stopped, race_stop, sleep_or_stop
from core.backoff import Backoff
from stream.errors import LeadershipLost

log = logging.getLogger(__name__)

_KEY = "hashtextextended('mission_runner:' || %s, 0)"
_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = " + _KEY + ")"
)

Conn = psycopg.AsyncConnection[tuple[object, ...]]

# libpq TCP keepalives: a dead peer is detected in about idle + interval * count seconds
# (and unacknowledged data gives up after tcp_user_timeout). Unix sockets ignore them.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


class LeaderLock:
    def __init__(
        self,
        *,
        conninfo: str,
        slot: str,
        backoff: Backoff,
        instance: str = "",
        check_interval: float = 2.0,
        check_timeout: float = 5.0,
    ) -> None:
        self.conninfo = conninfo
        self.slot = slot
        self.backoff = backoff
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        # Who holds (or waits for) the lock, for operators: pg_stat_activity.application_name.
        self.application_name = f"mission-runner leader {instance}".strip()[:63]
        self._conn: Conn | None = None
        self.waiting_on: str | None = None
        """Who holds the lock while this instance waits for it (for the status page)."""

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def _connect(self) -> Conn:
        return await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,
            application_name=self.application_name,
            connect_timeout=10,
            **KEEPALIVES,  # type: ignore[arg-type]
        )

    async def _holder(self, conn: Conn) -> str:
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
        """Take the lock if it is free; False if another session holds it. Connection errors
        propagate (one attempt)."""
        conn = await self._connect()
        try:
            cur = await conn.execute("SELECT pg_try_advisory_lock(" + _KEY + ")", (self.slot,))
            row = await cur.fetchone()
        except BaseException:
            await conn.close()
            raise
        if row is not None and row[0]:
            self._conn = conn
            return True
        await conn.close()
        return False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait for the lock (blocking on the server, no polling), reconnecting with backoff
        while the database is unreachable; False if `stop` came first."""
        attempt = 0
        while not stop.is_set():
            try:
                if await self._acquire_once(stop):
                    self.waiting_on = None
                    return True
                return False
            except (psycopg.OperationalError, OSError) as exc:
                attempt += 1
                delay = self.backoff.delay(attempt)
                self.waiting_on = "the database (unreachable)"
                log.warning(
                    "leader lock: database not reachable (%s); retrying in %.1f s",
                    str(exc).strip().splitlines()[0],
                    delay,
                )
                if await sleep_or_stop(stop, delay):
                    return False
        return False

    async def _acquire_once(self, stop: asyncio.Event) -> bool:
        if await self.try_acquire():
            return True
        conn = await self._connect()
        try:
            self.waiting_on = await self._holder(conn)
            log.warning(
                "another instance is active for slot %s (%s); waiting to take over",
                self.slot,
                self.waiting_on,
            )
            try:
                await race_stop(
                    conn.execute("SELECT pg_advisory_lock(" + _KEY + ")", (self.slot,)), stop
                )
            except Stopped:
                await self._abandon(conn)
                return False
        except BaseException:
            await self._abandon(conn)
            raise
        self._conn = conn
        log.info("took over slot %s: this instance is now active", self.slot)
        return True

    @staticmethod
    async def _abandon(conn: Conn) -> None:
        """Close a connection that may still wait on the lock. The server does not notice
        that a client went away while its backend waits for a lock, and that orphan would
        take the lock when it frees: cancel the wait on the server first."""
        with contextlib.suppress(Exception):
            await conn.cancel_safe(timeout=2.0)
        await conn.close()

    async def check(self) -> None:
        """Raise LeadershipLost unless this session still holds the lock (answered within
        `check_timeout`)."""
        conn = self._conn
        if conn is None or conn.closed:
            raise LeadershipLost("the leader lock is not held")
        try:
            async with asyncio.timeout(self.check_timeout):
                cur = await conn.execute(_HELD, (self.slot,))
                row = await cur.fetchone()
        except TimeoutError:
            raise LeadershipLost(
                f"the leader-lock connection did not answer within {self.check_timeout:g} s"
            ) from None
        except psycopg.Error as exc:
            raise LeadershipLost(f"the leader-lock connection broke: {exc}") from exc
        if row is None or not row[0]:
            raise LeadershipLost("this session no longer holds the leader lock")

    async def watch(self) -> NoReturn:
        """Return only by raising LeadershipLost when the lock's session is gone."""
        while True:
            await asyncio.sleep(self.check_interval)
            await self.check()

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()
