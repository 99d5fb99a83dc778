"""The command line against a real server: catch-up, status, rebuild, replay, doctor, run."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest
from psycopg import conninfo

from core.lsn import Lsn
from tests.fix_data import hold_the_slot, mission_insert, persisted, recompute, slot_row, write
from tests.fix_pg import TestDatabase
from tests.fix_service import ROOT, ServiceProcess, service_env

pytestmark = pytest.mark.integration


def cli(
    db: TestDatabase, *args: str, dsn: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = service_env(db, **env)
    if dsn is not None:
        environment["DATABASE_URL"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "mission_runner.cli", *args],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_catch_up_then_status(db: TestDatabase) -> None:
    write(db, mission_insert("u", "m1"), mission_insert("u", "m2"))
    done = cli(db, "catch-up")
    assert done.returncode == 0, done.stderr
    assert "2 missions" in done.stdout
    status = cli(db, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["slot"]["exists"] is True
    assert data["slot"]["active"] is False
    assert data["slot"]["wal_status"] in {"reserved", "extended"}
    assert data["checkpoint"]["lsn"] is not None
    assert data["snapshots"]["mission"] == {"live": 2, "deleted": 0}
    assert isinstance(data["slot"]["lag_bytes"], int)
    text = cli(db, "status")
    assert "checkpoint" in text.stdout and "mission snapshots: 2 live" in text.stdout
    assert data["checkpoint"]["epoch"] == 1


def test_status_says_when_the_lag_cannot_be_known_from_outside(db: TestDatabase) -> None:
    write(db, mission_insert("u", "m1"))
    assert cli(db, "catch-up").returncode == 0
    with db.connect() as conn:
        conn.execute("UPDATE mana_ai.stream_checkpoint SET commit_time = now() - interval '1 hour'")
    # WAL the slot has not confirmed: unknown from outside, at most the checkpoint's age.
    write(db, mission_insert("u", "m2"))
    data = json.loads(cli(db, "status", "--json").stdout)
    assert data["lag_seconds"] is None
    assert 3500 < data["lag_seconds_at_most"] < 3700
    assert "cannot be known from outside" in data["lag_note"]
    assert "at most" in cli(db, "status").stdout


def test_rebuild_discards_and_recomputes(db: TestDatabase) -> None:
    write(db, mission_insert("u", "m1"))
    assert cli(db, "catch-up").returncode == 0
    with db.connect() as conn:
        # Corrupt our own snapshot; a rebuild must restore it from the log.
        conn.execute("UPDATE mana_ai.mission_snapshots SET record = '{}'::jsonb")
    write(db, mission_insert("u", "m2"))
    done = cli(db, "rebuild")
    assert done.returncode == 0, done.stderr
    assert "rebuilt" in done.stdout
    assert persisted(db) == recompute(db)
    write(db, mission_insert("u", "m3"))
    assert cli(db, "catch-up").returncode == 0
    assert persisted(db) == recompute(db)


def test_replay_refuses_below_the_slot_and_beyond_the_server(db: TestDatabase) -> None:
    write(db, mission_insert("u", "m1"))
    assert cli(db, "catch-up").returncode == 0
    slot = slot_row(db)
    assert slot is not None
    confirmed = Lsn.parse(slot["confirmed_flush_lsn"])
    below = cli(db, "replay", "--from-lsn", str(Lsn(int(confirmed) - 1)))
    assert below.returncode == 1
    assert "rebuild" in below.stderr
    beyond = cli(db, "replay", "--from-lsn", "FF/0")
    assert beyond.returncode == 1
    assert "beyond" in beyond.stderr
    garbage = cli(db, "replay", "--from-lsn", "yesterday")
    assert garbage.returncode == 2


def test_replay_restarts_the_stream_at_the_position(db: TestDatabase) -> None:
    write(db, mission_insert("u", "m1"))
    assert cli(db, "catch-up").returncode == 0
    with db.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        here = row[0]
    write(db, mission_insert("u", "m2"))
    done = cli(db, "replay", "--from-lsn", here)
    assert done.returncode == 0, done.stderr
    assert f"replayed from {here}" in done.stdout
    assert "1 transactions applied" in done.stdout or "2 transactions applied" in done.stdout
    assert persisted(db) == recompute(db)


def test_doctor_passes_for_a_good_setup(db: TestDatabase) -> None:
    done = cli(db, "doctor")
    assert "[ok]   wal_level: logical" in done.stdout
    assert "REPLICATION privilege" in done.stdout
    assert "[FAIL]" not in done.stdout, done.stdout
    assert done.returncode == 0


def test_doctor_names_each_missing_privilege_with_its_fix(db: TestDatabase) -> None:
    with db.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS mr_limited")
        conn.execute("CREATE ROLE mr_limited LOGIN")
        conn.execute("GRANT SELECT, INSERT ON sync_changes TO mr_limited")
    try:
        dsn = conninfo.make_conninfo(db.dsn, user="mr_limited")
        done = cli(db, "doctor", dsn=dsn)
        assert done.returncode == 1
        assert "ALTER ROLE mr_limited REPLICATION;" in done.stdout
        assert "ALTER ROLE mr_limited BYPASSRLS;" in done.stdout
        assert "publication" in done.stdout
    finally:
        with db.connect() as conn:
            conn.execute("DROP OWNED BY mr_limited")
            conn.execute("DROP ROLE mr_limited")


def test_dev_schema_is_idempotent(pg_db: TestDatabase) -> None:
    assert cli(pg_db, "dev-schema").returncode == 0
    assert cli(pg_db, "dev-schema").returncode == 0
    with pg_db.connect() as conn:
        row = conn.execute(
            "SELECT relrowsecurity, relforcerowsecurity FROM pg_class"
            " WHERE oid = 'public.sync_changes'::regclass"
        ).fetchone()
        policies = conn.execute(
            "SELECT count(*) FROM pg_policies WHERE tablename = 'sync_changes'"
        ).fetchone()
    assert row == (True, True)
    assert policies == (2,)


def test_a_wrong_database_name_fails_at_once(db: TestDatabase) -> None:
    from psycopg import conninfo as ci

    started = time.monotonic()
    done = cli(db, "catch-up", dsn=ci.make_conninfo(db.dsn, dbname="no_such_database"))
    assert done.returncode == 2
    assert "no_such_database" in done.stderr and "DATABASE_URL" in done.stderr
    assert time.monotonic() - started < 15  # not retried like an unreachable server


def test_run_without_sync_changes_fails_clearly(pg_db: TestDatabase) -> None:
    done = cli(pg_db, "catch-up")
    assert done.returncode == 2
    assert "sync_changes" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_stops_cleanly_on_sigterm(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    svc = ServiceProcess(db).start()
    service_processes.append(svc)
    svc.wait_streaming()
    write(db, mission_insert("u", "m1"))
    time.sleep(0.3)
    assert svc.proc is not None
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(15) == 0, svc.output()
    assert time.monotonic() - started < 10
    slot = slot_row(db)
    assert slot is not None and not slot["active"]
    assert persisted(db) == recompute(db)


def test_wrong_database_url_exits_2(db: TestDatabase) -> None:
    done = cli(
        db,
        "catch-up",
        dsn="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
        MISSION_RUNNER_CONNECT_RETRY="1s",
    )
    assert done.returncode == 2
    assert "DATABASE_URL" in done.stderr


def _postmasters_of(pgdata: str) -> list[int]:
    """Pids of processes whose command line names this data directory."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pgdata.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_the_embedded_server_stops_with_the_program(tmp_path: pytest.TempPathFactory) -> None:
    # `make run` on a fresh machine: the demo starts the embedded server in a new data
    # directory (which takes one restart to turn on wal_level=logical) and is stopped with
    # Ctrl-C. The server must stop with it.
    import os

    data_dir = tmp_path / "embedded"  # type: ignore[operator]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSION_RUNNER_")}
    env.pop("DATABASE_URL", None)
    env.update(MISSION_RUNNER_DATA_DIR=str(data_dir), HTTP_PORT="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mission_runner.cli", "demo"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "stream caught up" in line:
                break
        # Ctrl-C in a terminal signals the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(seen[-20:])
    pgdata = str(data_dir / "pgdata")
    deadline = time.monotonic() + 10
    while _postmasters_of(pgdata) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _postmasters_of(pgdata) == []


def test_the_embedded_server_is_stopped_after_a_restart(tmp_path: pytest.TempPathFactory) -> None:
    # The restart that turns on logical decoding makes a new postmaster: the one stopped at
    # exit must be that one.
    from pathlib import Path

    from mission_runner.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(Path(str(tmp_path)) / "handle", delete_on_exit=True)
    pg.start()
    pg.restart()
    assert _postmasters_of(str(pg.pgdata)) != []
    pg.stop_at_exit()  # what runs at exit: stop, then delete
    assert _postmasters_of(str(pg.pgdata)) == []
    assert not pg.pgdata.exists()


def test_catch_up_stopped_before_it_caught_up_says_so(db: TestDatabase) -> None:
    write(db, mission_insert("u", "m1"))
    assert cli(db, "catch-up").returncode == 0

    async def hold_then_run() -> subprocess.CompletedProcess[str]:
        holder = await hold_the_slot(db)  # the slot is busy: catch-up cannot stream
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mission_runner.cli",
                "catch-up",
                env=service_env(db),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(3)
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            await holder.close()
        assert proc.returncode is not None
        return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())

    done = asyncio.run(hold_then_run())
    assert done.returncode == 1, done.stdout + done.stderr
    assert "caught up:" not in done.stdout
    assert "stopped before catching up" in done.stdout + done.stderr
