"""The composition root: builds every collaborator once, from Settings, and hands them out.

Nothing below this module creates its own connections, registries or clocks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from mission_runner.clock import Clock, SystemClock
from mission_runner.embedded import EmbeddedPostgres
from mission_runner.errors import ConfigurationError
from mission_runner.ingest import Ingestor
from mission_runner.metrics import Metrics
from mission_runner.settings import Settings

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
    embedded: EmbeddedPostgres | None = None


async def check_connection(dsn: str) -> None:
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise ConfigurationError("DATABASE_URL", f"cannot connect: {str(exc).strip()}") from None
    await conn.close()


@asynccontextmanager
async def open_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    dsn: str | None = None,
) -> AsyncIterator[App]:
    embedded = None
    if dsn is None:
        dsn, embedded = resolve_database(settings)
    await check_connection(dsn)
    pool = make_pool(dsn)
    await pool.open(wait=True, timeout=30)
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    try:
        ingestor = Ingestor(
            settings=settings,
            conninfo=dsn,
            pool=pool,
            clock=clock,
            metrics=metrics,
        )
        yield App(settings, dsn, pool, clock, metrics, ingestor, embedded)
    finally:
        await pool.close()


def redact(dsn: str) -> str:
    """A connection string safe for logs: no password."""
    try:
        params = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = "***"
    return pg_conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
