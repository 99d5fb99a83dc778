"""The `mission-runner` command line.

Exit codes: 0 done, 1 failed at run time, 2 a setting or the database setup is wrong (the
message names the setting, or the problem and its fix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import psycopg

from core import pgerrors
from core.aio import sleep_or_stop
from core.errors import ConfigurationError, MissionRunnerError, SetupError
from core.failpoints import FailPoints
from core.lsn import Lsn
from mission_runner import checks
from mission_runner import doctor as doctor_mod
from mission_runner.app import App, check_connection, open_app, redact, resolve_database
from mission_runner.demo import DemoUsers
from mission_runner.devschema import create_dev_schema
from mission_runner.logs import setup_logging
from mission_runner.migrations import migrate
from mission_runner.preflight import require
from mission_runner.runtime import tune_gc
from mission_runner.settings import Settings
from mission_runner.status import collect_status, format_status
from mission_runner.tracing import setup_tracing
from projections import persistence
from stream import slots
from stream.supervisor import Prepare, Supervisor
from writer.fence import Fence

log = logging.getLogger("mission_runner")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def prepare_database(app: App) -> None:
    """Refuse a setup the service cannot work with (the failures `doctor` says stop the
    start, as SetupError), then migrate our schema, before anything reads it."""
    async with app.pool.connection() as conn:
        await require(conn, app.settings, checks.SERVICE)
        await migrate(conn)


async def _tune_gc_after_boot(supervisor: Supervisor) -> None:
    """Tune the GC once the first snapshots are loaded (see mission_runner.runtime)."""
    await supervisor.booted.wait()
    tune_gc()


async def serve(app: App, stop: asyncio.Event) -> None:
    """The whole service: HTTP, lag monitor, ingest and the mission runtime, until `stop`."""
    from mission_runner import http

    app.status = http.StatusApp(
        settings=app.settings,
        supervisor=app.supervisor,
        runtime=app.runtime,
        monitor=app.monitor,
        metrics=app.metrics,
        clock=app.clock,
    )
    runner = await http.serve(app.status, app.settings.http_host, app.settings.http_port)
    try:
        await prepare_database(app)
        async with asyncio.TaskGroup() as tg:
            gc_tuning = tg.create_task(_tune_gc_after_boot(app.supervisor), name="gc tuning")
            tg.create_task(app.monitor.run(stop), name="lag monitor")
            tg.create_task(app.runtime.run(stop), name="mission runtime")
            await app.supervisor.run(stop)
            gc_tuning.cancel()
    finally:
        await runner.cleanup()


async def catch_up(app: App, stop: asyncio.Event, *, prepare: Prepare | None = None) -> None:
    """Lead once, apply what was committed before, persist, confirm (`catch-up`, `rebuild`,
    `replay`)."""
    async with asyncio.TaskGroup() as tg:
        gc_tuning = tg.create_task(_tune_gc_after_boot(app.supervisor), name="gc tuning")
        await app.supervisor.run(stop, catch_up=True, prepare=prepare)
        gc_tuning.cancel()
    if not app.supervisor.caught_up:
        raise MissionRunnerError(
            "stopped before catching up: nothing after the checkpoint"
            f" {app.ingest.persisted_lsn} was confirmed"
        )


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with open_app(settings) as app:
        log.info(
            "mission-runner starting on %s with the %s planner",
            redact(app.dsn),
            app.runtime.planner_name,
        )
        await serve(app, stop)
    return EXIT_OK


def _caught_up(app: App) -> str:
    ing = app.ingest
    return (
        f"checkpoint {ing.persisted_lsn}, {ing.transactions_applied} transactions and"
        f" {ing.rows_applied} rows applied, {len(ing.missions)} missions, {len(ing.agents)} agents"
    )


async def cmd_catch_up(settings: Settings, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with open_app(settings) as app:
        await prepare_database(app)
        await catch_up(app, stop)
        print(f"caught up: {_caught_up(app)}")
    return EXIT_OK


async def _connect(settings: Settings) -> psycopg.AsyncConnection[tuple[object, ...]]:
    """One connection for the commands that only read or check: the same start-up handling
    as `run` (waits for a starting server, exit 2 naming DATABASE_URL when it cannot)."""
    dsn, _embedded = await asyncio.to_thread(resolve_database, settings)
    await check_connection(
        dsn, retry_for=settings.connect_retry, backoff=settings.reconnect_backoff()
    )
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise ConfigurationError("DATABASE_URL", f"cannot connect: {exc}") from None


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    async with await _connect(settings) as conn:
        await require(conn, settings, checks.STATUS)
        status = await collect_status(conn, slot=settings.slot)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return EXIT_OK


async def _refuse_if_active(app: App) -> bool:
    async with app.pool.connection() as conn:
        slot = await slots.get_slot(conn, app.settings.slot)
    if slot is not None and slot.active:
        print(
            f"slot {app.settings.slot} is in use by PID {slot.active_pid}: stop the running"
            " service first",
            file=sys.stderr,
        )
        return True
    return False


async def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with open_app(settings) as app:
        await prepare_database(app)
        if await _refuse_if_active(app):
            return EXIT_FAILED
        log.warning("rebuild: discarding snapshots and checkpoint of slot %s", settings.slot)

        async def discard(conn: psycopg.AsyncConnection[tuple[object, ...]], fence: Fence) -> None:
            await persistence.reset(conn, fence)

        await catch_up(app, stop, prepare=discard)
        print(
            f"rebuilt: checkpoint {app.ingest.persisted_lsn}, "
            f"{len(app.ingest.missions)} missions, {len(app.ingest.agents)} agents"
        )
    return EXIT_OK


async def _check_replay_target(app: App, target: Lsn) -> str | None:
    """Why replaying from `target` is refused, or None."""
    settings = app.settings
    async with app.pool.connection() as conn:
        slot = await slots.get_slot(conn, settings.slot)
        current = await slots.current_wal_lsn(conn)
    if slot is None or slot.confirmed_flush_lsn is None:
        return (
            f"slot {settings.slot} does not exist: nothing to replay from; use"
            " `mission-runner rebuild`"
        )
    if target < slot.confirmed_flush_lsn:
        return (
            f"{target} is below the slot's confirmed position {slot.confirmed_flush_lsn}: the"
            " server no longer has those changes for this slot. Use `mission-runner rebuild`"
            " to rebuild from the table."
        )
    if target > current:
        return f"{target} is beyond the server's current WAL position {current}"
    if slot.active:
        return (
            f"slot {settings.slot} is in use by PID {slot.active_pid}: stop the running"
            " service first"
        )
    return None


async def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    try:
        target = Lsn.parse(args.from_lsn)
    except ValueError as exc:
        print(f"--from-lsn: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with open_app(settings) as app:
        await prepare_database(app)
        refused = await _check_replay_target(app, target)
        if refused is not None:
            print(refused, file=sys.stderr)
            return EXIT_FAILED

        async def move_checkpoint(
            conn: psycopg.AsyncConnection[tuple[object, ...]], fence: Fence
        ) -> None:
            batch = persistence.PersistBatch(
                missions=[],
                agents=[],
                dead_letters=[],
                checkpoint=persistence.Checkpoint(settings.slot, target, None),
            )
            await persistence.write_batch(conn, batch, fence)
            log.warning("replay: checkpoint of slot %s set to %s", settings.slot, target)

        await catch_up(app, stop, prepare=move_checkpoint)
        print(
            f"replayed from {target}: checkpoint now {app.ingest.persisted_lsn}, "
            f"{app.ingest.transactions_applied} transactions applied"
        )
    return EXIT_OK


async def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    async with await _connect(settings) as conn:
        checks = await doctor_mod.run_checks(conn, settings)
    print(doctor_mod.format_checks(checks))
    failed = [c for c in checks if c.result == doctor_mod.FAIL]
    return EXIT_FAILED if failed else EXIT_OK


async def cmd_dev_schema(settings: Settings, args: argparse.Namespace) -> int:
    async with await _connect(settings) as conn:
        await require(conn, settings, checks.DEV_SCHEMA)
        await create_dev_schema(conn)
    print("created public.sync_changes (development schema) if it was missing")
    return EXIT_OK


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    if settings.database_url is not None and not args.allow_database_url:
        print(
            "demo writes synthetic users into sync_changes; it runs on the embedded server."
            " Unset DATABASE_URL, or pass --allow-database-url for a disposable database.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with open_app(settings) as app:
        async with app.pool.connection() as conn:
            await require(conn, settings, checks.DEV_SCHEMA)
            await create_dev_schema(conn)
        demo = DemoUsers(dsn=app.dsn, clock=app.clock, users=args.users, runtime=app.runtime)
        where = app.embedded.pgdata if app.embedded else "DATABASE_URL"
        print(
            f"demo: PostgreSQL at {where}; synthetic users edit missions and agents; the"
            f" {app.runtime.planner_name} planner plans them when due. Status page:"
            f" http://{settings.http_host}:{settings.http_port}/  (Ctrl-C stops)",
            flush=True,
        )

        async def report() -> None:
            while not await sleep_or_stop(stop, args.report_every):
                ing, rt = app.ingest, app.runtime
                written = sum(1 for r in rt.recent if r.outcome == "written")
                print(
                    f"[{app.supervisor.phase}] {ing.transactions_applied} transactions,"
                    f" {ing.rows_applied} rows applied; {ing.missions.live_count()} missions,"
                    f" {ing.agents.live_count()} agents; {len(rt.scheduler.index)} scheduled,"
                    f" {rt.in_flight} in flight, {written} iterations written;"
                    f" checkpoint {ing.persisted_lsn}",
                    flush=True,
                )

        async with asyncio.TaskGroup() as tg:
            tg.create_task(serve(app, stop))
            tg.create_task(demo.run(stop, interval=args.interval))
            tg.create_task(report())
            if args.duration:

                async def stop_later() -> None:
                    await asyncio.sleep(args.duration)
                    stop.set()

                tg.create_task(stop_later())
    return EXIT_OK


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "run": cmd_run,
    "catch-up": cmd_catch_up,
    "status": cmd_status,
    "rebuild": cmd_rebuild,
    "replay": cmd_replay,
    "doctor": cmd_doctor,
    "dev-schema": cmd_dev_schema,
    "demo": cmd_demo,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mission-runner",
        description="Runs AI missions from a logical-replication stream of sync_changes. "
        "Configured by environment variables (see README).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="the service: stream, persist, stay current")
    sub.add_parser("catch-up", help="apply everything committed before it started, then exit")
    st = sub.add_parser("status", help="slot, lag, checkpoint and snapshot counts")
    st.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("rebuild", help="discard snapshots and checkpoint, rebuild without a gap")
    rp = sub.add_parser("replay", help="restart the stream at an LSN at or after the slot's")
    rp.add_argument("--from-lsn", required=True, metavar="LSN", help="e.g. 0/16B3748")
    sub.add_parser("doctor", help="preflight checks of server and role, with fixes")
    sub.add_parser("dev-schema", help="create sync_changes (development and tests only)")
    dm = sub.add_parser("demo", help="embedded server, dev schema, synthetic users, the service")
    dm.add_argument("--users", type=int, default=4)
    dm.add_argument("--interval", type=float, default=1.0, help="seconds between user edits")
    dm.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    dm.add_argument("--report-every", type=float, default=5.0)
    dm.add_argument("--allow-database-url", action="store_true")
    return p


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _refused_by_setup(exc: BaseException) -> bool:
    return pgerrors.sqlstate_of(exc) in checks.REFUSED_SQLSTATES


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
        FailPoints(settings.failpoints)  # a bad spec is a setting error, at start
    except ConfigurationError as exc:
        print(f"mission-runner: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings)
    tracing = setup_tracing(settings)
    try:
        try:
            return asyncio.run(COMMANDS[args.command](settings, args))
        except BaseExceptionGroup as group:
            # Errors of the service's tasks arrive grouped; report ours like any other.
            leaf = _first_leaf(group)
            if isinstance(leaf, MissionRunnerError) or _refused_by_setup(leaf):
                raise leaf from None
            raise
    except ConfigurationError as exc:
        print(f"mission-runner: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SetupError as exc:
        print(f"mission-runner: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MissionRunnerError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except psycopg.Error as exc:
        if not _refused_by_setup(exc):
            raise
        # A refusal no check foresaw: a setup problem all the same, classified by SQLSTATE.
        print(
            f"mission-runner: the database refused: {exc.diag.message_primary}"
            f" (SQLSTATE {exc.sqlstate})\n  fix: `mission-runner doctor` lists what the role"
            " needs",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    sys.exit(main())
