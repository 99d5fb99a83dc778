"""pytest plugin: the service against a real server, in this process and as separate
processes, and the `db` fixture (a fresh database with the development `sync_changes`).

In-process services use the compiled hot-path modules unless `MISSION_RUNNER_PURE_PYTHON`
is set for the test run (`make test-pg15` sets it); service processes inherit it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from core.failpoints import FailPoints
from mission_runner.app import App, open_app
from mission_runner.cli import prepare_database
from mission_runner.devschema import DDL
from mission_runner.metrics import Metrics
from mission_runner.settings import Settings
from planner.runtime import MissionRuntime
from projections.ingest import Ingest
from stream.supervisor import Supervisor
from tests.fix_data import slot_row
from tests.fix_pg import TestDatabase

ROOT = Path(__file__).resolve().parents[1]

PURE_PYTHON = os.environ.get("MISSION_RUNNER_PURE_PYTHON", "").strip().lower() in (
    "1",
    "true",
    "yes",
    "on",
)


@pytest.fixture
def db(pg_db: TestDatabase) -> TestDatabase:
    """A fresh database with the development `sync_changes` schema."""
    with pg_db.connect() as conn:
        conn.execute(DDL.encode())
    return pg_db


def settings_for(db: TestDatabase, **overrides: Any) -> Settings:
    base = Settings(
        database_url=db.dsn,
        slot=db.slot,
        status_interval=1.0,
        heartbeat_interval=0,
        batch_max_delay=0.02,
        reconnect_min_backoff=0.05,
        reconnect_max_backoff=0.5,
        pure_python=PURE_PYTHON,
    )
    return replace(base, **overrides)


def service_env(db: TestDatabase, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSION_RUNNER_")}
    env.update(
        DATABASE_URL=db.dsn,
        MISSION_RUNNER_SLOT=db.slot,
        MISSION_RUNNER_STATUS_INTERVAL="1s",
        MISSION_RUNNER_BATCH_MAX_DELAY="20ms",
        MISSION_RUNNER_RECONNECT_MIN_BACKOFF="50ms",
        MISSION_RUNNER_RECONNECT_MAX_BACKOFF="500ms",
        MISSION_RUNNER_PURE_PYTHON="true" if PURE_PYTHON else "false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


async def eventually(
    predicate: Callable[[], bool], within: float = 20.0, what: str = "condition"
) -> None:
    timeout = within
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- the service in this process --------------------------------------------------------


@dataclass
class Running:
    app: App
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def ingest(self) -> Ingest:
        return self.app.ingest

    @property
    def supervisor(self) -> Supervisor:
        return self.app.supervisor

    @property
    def runtime(self) -> MissionRuntime:
        return self.app.runtime


Main = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


@asynccontextmanager
async def _running(app: App, main: Main, until: Callable[[App], bool]) -> AsyncIterator[Running]:
    """Run `main(stop)` (the service's top task) until the context ends; enter once
    `until(app)` holds."""
    stop = asyncio.Event()
    task = asyncio.create_task(main(stop))
    try:
        async with asyncio.timeout(30):
            while not until(app):
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield Running(app, stop, task)
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


@asynccontextmanager
async def running_service(
    db: TestDatabase,
    settings: Settings | None = None,
    *,
    metrics: Metrics | None = None,
    failpoints: FailPoints | None = None,
) -> AsyncIterator[Running]:
    """The ingest alone (no runtime, no HTTP), in this process; yields once it streams."""
    settings = settings or settings_for(db)
    async with open_app(
        settings, dsn=db.dsn, metrics=metrics or Metrics(), failpoints=failpoints
    ) as app:
        await prepare_database(app)
        async with _running(
            app, app.supervisor.run, lambda a: a.supervisor.streaming.is_set()
        ) as running:
            yield running


@asynccontextmanager
async def running_full_service(
    db: TestDatabase,
    settings: Settings | None = None,
    *,
    metrics: Metrics | None = None,
    until: Callable[[App], bool] | None = None,
) -> AsyncIterator[Running]:
    """Ingest, mission runtime, lag monitor and HTTP (on a free port), in this process;
    yields once `until(app)` holds (by default: the runtime dispatches)."""
    from mission_runner.cli import serve

    settings = replace(settings or settings_for(db), http_port=0)
    async with open_app(settings, dsn=db.dsn, metrics=metrics or Metrics()) as app:

        async def main(stop: asyncio.Event) -> None:
            await serve(app, stop)

        async with _running(app, main, until or (lambda a: a.runtime.accepting)) as running:
            yield running


# -- the service as a separate process --------------------------------------------------


class ServiceProcess:
    def __init__(self, db: TestDatabase, *args: str, **env: str) -> None:
        self.db = db
        self.args = args or ("run",)
        self.env = service_env(db, **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(f"/tmp/{db.name}-{uuid.uuid4().hex[:6]}.log")

    def start(self) -> ServiceProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mission_runner.cli", *self.args],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_streaming(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: bool((s := slot_row(self.db)) and s["active"]), timeout, "the service to stream"
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        wait_until(
            lambda: not ((s := slot_row(self.db)) and s["active"]), 30, "the slot to be released"
        )

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


@pytest.fixture
def service_processes() -> Iterator[list[ServiceProcess]]:
    procs: list[ServiceProcess] = []
    yield procs
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
