"""The composition root: builds every collaborator once, from Settings, and hands them out.

Nothing below this module creates its own connections, registries or clocks. The wiring, in
the direction data flows:

    Supervisor (stream)  leads the slot, streams, drives  ->  Ingest (projections)
    Ingest               applies, persists, publishes to  ->  ChangeFeed (planner)
    Supervisor           begins and ends terms in         ->  Terms (planner)
    MissionRuntime       follows both, dispatches via     ->  Dispatcher -> writer
    LagMonitor           samples the server for the supervisor's lag tracker
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

from core import pgerrors
from core.backoff import Backoff
from core.clock import Clock, SystemClock
from core.errors import ConfigurationError
from core.failpoints import FailPoints
from mission_runner.embedded import EmbeddedPostgres
from mission_runner.metrics import Metrics
from mission_runner.settings import Settings
from planner.catalog import load_catalog
from planner.dispatch import Dispatcher
from planner.feed import ChangeFeed
from planner.offline import OfflinePlanner
from planner.runtime import MissionRuntime
from planner.service import CatalogPlanner, MissionPlanner
from planner.terms import Terms
from projections.ingest import Ingest, SnapshotViews
from stream.monitor import LagMonitor
from stream.supervisor import Supervisor

if TYPE_CHECKING:
    import aiohttp

    from mission_runner.http import StatusApp

log = logging.getLogger(__name__)

EMBEDDED_DBNAME = "mission_runner"

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]]


def resolve_database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The connection string to use: DATABASE_URL, or the embedded server's (started now).
    Blocking (it may start a server): call it in a thread."""
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


def make_pool(dsn: str, *, name: str, min_size: int = 2, max_size: int = 8) -> Pool:
    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        kwargs={
            "application_name": name,
            "autocommit": True,
            "options": "-c timezone=UTC",
        },
        name=name,
    )


async def check_connection(dsn: str, *, retry_for: float, backoff: Backoff) -> None:
    """Connect once. When the server is up but refuses us (credentials, database name,
    pg_hba), fail at once; an unreachable or starting server is retried for `retry_for`
    seconds (a pod may start before its database). ConfigurationError (DATABASE_URL)."""
    deadline = time.monotonic() + retry_for
    attempt = 0
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=10)
        except psycopg.OperationalError as exc:
            text = str(exc).strip()
            refused = await asyncio.to_thread(pgerrors.connect_refused_for_good, dsn)
            if refused or time.monotonic() > deadline:
                raise ConfigurationError("DATABASE_URL", f"cannot connect: {text}") from None
            attempt += 1
            log.warning("database not reachable yet (%s); retrying", text.splitlines()[0])
            await asyncio.sleep(backoff.delay(attempt))
            continue
        await conn.close()
        return


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


@dataclass
class App:
    settings: Settings
    dsn: str
    pool: Pool
    persist_pool: Pool
    clock: Clock
    metrics: Metrics
    failpoints: FailPoints
    feed: ChangeFeed
    terms: Terms
    ingest: Ingest
    supervisor: Supervisor
    runtime: MissionRuntime
    monitor: LagMonitor
    embedded: EmbeddedPostgres | None = None
    status: StatusApp | None = None  # the HTTP surface, built by `serve`


def build(
    settings: Settings,
    *,
    dsn: str,
    pool: Pool,
    persist_pool: Pool,
    clock: Clock,
    metrics: Metrics,
    planner: MissionPlanner,
    failpoints: FailPoints,
    embedded: EmbeddedPostgres | None = None,
) -> App:
    """Every collaborator, wired (see the module docstring)."""
    feed = ChangeFeed()
    terms = Terms()
    ingest = Ingest(
        slot=settings.slot,
        persist_pool=persist_pool,
        clock=clock,
        metrics=metrics.snapshots,
        options=settings.group_commit_options(),
        retry=settings.reconnect_backoff(),
        feed=feed,
        failpoints=failpoints,
        compiled=not settings.pure_python,
    )
    supervisor = Supervisor(
        conninfo=dsn,
        pool=pool,
        ingest=ingest,
        terms=terms,
        options=settings.supervisor_options(),
        clock=clock,
        metrics=metrics.stream,
    )
    options = settings.runtime_options()
    views = SnapshotViews(ingest)
    dispatcher = Dispatcher(
        pool=pool,
        planner=planner,
        snapshots=views,
        clock=clock,
        metrics=metrics.runtime,
        max_attempts=options.max_attempts,
        retry=options.retry,
        failpoints=failpoints,
    )
    runtime = MissionRuntime(
        snapshots=views,
        feed=feed,
        terms=terms,
        dispatcher=dispatcher,
        pool=pool,
        clock=clock,
        metrics=metrics.runtime,
        options=options,
    )
    monitor = LagMonitor(
        supervisor=supervisor,
        pool=pool,
        clock=clock,
        metrics=metrics.lag,
        slot=settings.slot,
        max_silence=settings.ready_max_silence,
    )
    return App(
        settings,
        dsn,
        pool,
        persist_pool,
        clock,
        metrics,
        failpoints,
        feed,
        terms,
        ingest,
        supervisor,
        runtime,
        monitor,
        embedded,
    )


@asynccontextmanager
async def open_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    dsn: str | None = None,
    planner: MissionPlanner | None = None,
    failpoints: FailPoints | None = None,
) -> AsyncIterator[App]:
    embedded = None
    if dsn is None:
        resolved, embedded = await asyncio.to_thread(resolve_database, settings)
    else:
        resolved = dsn
    dsn = resolved
    await check_connection(
        dsn, retry_for=settings.connect_retry, backoff=settings.reconnect_backoff()
    )
    clock = clock or SystemClock()
    session = None
    if planner is None and settings.planner_url is not None:
        import aiohttp

        session = aiohttp.ClientSession()
    pool = make_pool(dsn, name="mission-runner")
    # The group commit's own connection: dispatches never starve it of one.
    persist_pool = make_pool(dsn, name="mission-runner persist", min_size=1, max_size=1)
    try:
        await pool.open(wait=True, timeout=30)
        await persist_pool.open(wait=True, timeout=30)
        yield build(
            settings,
            dsn=dsn,
            pool=pool,
            persist_pool=persist_pool,
            clock=clock,
            metrics=metrics or Metrics(),
            planner=planner or make_planner(settings, clock=clock, session=session),
            failpoints=failpoints or FailPoints(settings.failpoints),
            embedded=embedded,
        )
    finally:
        await persist_pool.close()
        await pool.close()
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
