"""The composition root: builds every collaborator once, from Settings, and hands them out.

Nothing below this module creates its own connections, registries or clocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from core.clock import Clock, SystemClock
from core.errors import ConfigurationError
from mission_runner.embedded import EmbeddedPostgres
from mission_runner.ingest import Ingestor
from mission_runner.metrics import Metrics
from mission_runner.missions import MissionRuntime
from mission_runner.monitor import LagMonitor
from mission_runner.settings import Settings

if TYPE_CHECKING:
    import aiohttp

    from mission_runner.http import StatusApp
from planner.catalog import load_catalog
from planner.offline import OfflinePlanner
from planner.service import CatalogPlanner, MissionPlanner

log = logging.getLogger(__name__)

EMBEDDED_DBNAME = "mission_runner"

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]]


def resolve_database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The connection string to use: DATABASE_URL, or the embedded server's (started now)."""
    if settings.database_url is not None:
        return settings.database_url, None
    server = EmbeddedPostgres(settings.data_dir.resolve())
    admin = server.start()
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DBNAME,)
        ).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(EMBEDDED_DBNAME)))
    dsn = server.dsn(EMBEDDED_DBNAME)
    log.info("no DATABASE_URL: using the embedded PostgreSQL in %s", server.pgdata)
    return dsn, server


def make_pool(dsn: str, *, max_size: int = 8) -> Pool:
    return AsyncConnectionPool(
        dsn,
        min_size=2,
        max_size=max_size,
        open=False,
        kwargs={
            "application_name": "mission-runner",
            "autocommit": True,
            "options": "-c timezone=UTC",
        },
        name="mission-runner",
    )


@dataclass
class App:
    settings: Settings
    dsn: str
    pool: Pool
    clock: Clock
    metrics: Metrics
    ingestor: Ingestor
    runtime: MissionRuntime
    monitor: LagMonitor
    embedded: EmbeddedPostgres | None = None
    status: StatusApp | None = None  # the HTTP surface, built by `serve`


def make_planner(
    settings: Settings, *, clock: Clock, session: aiohttp.ClientSession | None
) -> MissionPlanner:
    """The LLM planner at PLANNER_URL, or the offline planner when it is unset."""
    catalog = load_catalog(settings.tool_catalog)
    if settings.planner_url is None:
        return CatalogPlanner(planner=OfflinePlanner(clock=clock), catalog=catalog, name="offline")
    assert session is not None
    from planner.llm import ChatClient  # aiohttp: only for the service, not for catch-up
    from planner.loop import LlmPlanner

    client = ChatClient(
        session=session,
        base_url=settings.planner_url,
        api_key=settings.planner_api_key or "",
        model=settings.planner_model,
        timeout=settings.planner_timeout,
        clock=clock,
    )
    return CatalogPlanner(
        planner=LlmPlanner(client=client), catalog=catalog, name=f"llm:{client.provider}"
    )


# The server answered, and the answer will not change by waiting (libpq reports these
# connection-time errors without an SQLSTATE, so the message is all there is).
_FINAL_CONNECT_ERRORS = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "permission denied",
    "too many connections for role",
)


def _refused_for_good(exc: psycopg.OperationalError) -> bool:
    sqlstate = exc.sqlstate or ""
    if sqlstate.startswith("28") or sqlstate == "3D000":
        return True
    text = str(exc)
    return any(marker in text for marker in _FINAL_CONNECT_ERRORS)


async def check_connection(dsn: str, *, retry_for: float) -> None:
    """Connect once. Wrong credentials or database name fail at once; an unreachable or
    starting server is retried for `retry_for` seconds (a pod may start before its database)."""
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=10)
        except psycopg.OperationalError as exc:
            text = str(exc).strip()
            if _refused_for_good(exc) or time.monotonic() > deadline:
                raise ConfigurationError("DATABASE_URL", f"cannot connect: {text}") from None
            log.warning("database not reachable yet (%s); retrying", text.splitlines()[0])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        await conn.close()
        return


@asynccontextmanager
async def open_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    dsn: str | None = None,
    planner: MissionPlanner | None = None,
) -> AsyncIterator[App]:
    embedded = None
    if dsn is None:
        dsn, embedded = resolve_database(settings)
    await check_connection(dsn, retry_for=settings.connect_retry)
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    session = None
    if planner is None and settings.planner_url is not None:
        import aiohttp

        session = aiohttp.ClientSession()
    try:
        mission_planner = planner or make_planner(settings, clock=clock, session=session)
        pool = make_pool(dsn)
        await pool.open(wait=True, timeout=30)
        try:
            ingestor = Ingestor(
                settings=settings, conninfo=dsn, pool=pool, clock=clock, metrics=metrics
            )
            runtime = MissionRuntime(
                settings=settings,
                ingestor=ingestor,
                pool=pool,
                planner=mission_planner,
                clock=clock,
                metrics=metrics,
            )
            monitor = LagMonitor(
                ingestor=ingestor, pool=pool, clock=clock, metrics=metrics, slot=settings.slot
            )
            yield App(settings, dsn, pool, clock, metrics, ingestor, runtime, monitor, embedded)
        finally:
            await pool.close()
    finally:
        if session is not None:
            await session.close()


def redact(dsn: str) -> str:
    """A connection string safe for logs: no password."""
    try:
        params = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = "***"
    return pg_conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
