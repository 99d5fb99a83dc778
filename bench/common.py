"""Shared set-up for the benchmarks: a throwaway server and database with the dev schema."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from mission_runner.devschema import DDL
from mission_runner.embedded import EmbeddedPostgres

BENCH_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    # A vacuum of the freshly loaded table would start at a random moment, usually during a
    # measured run, and add its CPU and its WAL (~85 MB here, decoded by the walsender) to
    # whichever consumer it hits. Benchmarks measure consumers, so nothing vacuums.
    "autovacuum": "off",
}


@dataclass
class BenchServer:
    dsn: str
    version: str
    run_program: Callable[[str, list[str]], None]
    """Runs a PostgreSQL client program of the server's version (`pg_recvlogical`, ...)."""


@contextmanager
def bench_server() -> Iterator[BenchServer]:
    """The embedded PostgreSQL 18 in a temporary directory, or BENCH_DSN / BENCH_BINDIR."""
    if dsn := os.environ.get("BENCH_DSN"):
        bindir = Path(os.environ.get("BENCH_BINDIR", "/usr/lib/postgresql/15/bin"))

        def run_binary(name: str, args: list[str]) -> None:
            subprocess.run([str(bindir / name), *args], check=True)

        yield BenchServer(dsn, _version(dsn), run_binary)
        return
    tmp = tempfile.mkdtemp(prefix="mrbench", dir="/tmp")
    server = EmbeddedPostgres(Path(tmp), delete_on_exit=True, extra_settings=BENCH_SETTINGS)
    try:
        admin = server.start()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS bench")
            conn.execute("CREATE DATABASE bench")
        dsn = server.dsn("bench")
        def run_embedded(name: str, args: list[str]) -> None:
            server.program(name)(args)

        yield BenchServer(dsn, _version(dsn), run_embedded)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        assert row is not None
        return str(row[0])


def create_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DDL.encode())


# About 300 bytes of JSON per row. Inserts carry the whole record with `field_meta = {}`
# (as the sync service writes them); updates carry the changed fields, each with an object
# stamp, as the web app writes them.
INSERT_DATA = (
    "jsonb_build_object('id', 'm' || (i %% %s), 'title', 'Mission number ' || i, 'objective',"
    " 'Keep the garden project on track and summarise what changed this week', 'state',"
    " 'active', 'nextRunAt', '2026-11-22T10:00:00.000Z', 'cadence',"
    " jsonb_build_object('kind', 'daily', 'atHour', 8, 'atMinute', 30), 'iterations', '[]'::jsonb)"
)
UPDATE_DATA = (
    "jsonb_build_object('title', 'Mission number ' || i, 'objective',"
    " 'Keep the garden project on track and summarise what changed in week ' || i,"
    " 'nextRunAt', to_char((timestamp '2026-11-22 10:00' + i * interval '1 minute'),"
    " 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), 'cadence',"
    " jsonb_build_object('kind', 'daily', 'atHour', 8, 'atMinute', i %% 60),"
    " 'inputs', jsonb_build_array(jsonb_build_object('module', 'notes', 'table', 'notes',"
    " 'id', 'n' || i)))"
)
STAMP = (
    "jsonb_build_object('at', to_char(clock_timestamp() AT TIME ZONE 'UTC',"
    " 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), 'actor', jsonb_build_object('kind', 'user'),"
    " 'origin', 'user')"
)
UPDATE_META = (
    f"(SELECT jsonb_object_agg(k, s) FROM (SELECT {STAMP} AS s) st,"
    " unnest(ARRAY['title', 'objective', 'nextRunAt', 'cadence', 'inputs']) k)"
)


def insert_missions(
    dsn: str, *, rows: int, missions: int, tx_size: int = 1000, users: int = 100
) -> None:
    """`rows` mission rows over `missions` records (first an insert of each, then updates),
    in transactions of `tx_size`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, rows, tx_size):
            end = min(rows, start + tx_size) - 1
            conn.execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                " field_meta, client_id)"
                " SELECT 'ai', 'aiMissions', 'm' || (i %% %s), 'u' || ((i %% %s) %% %s),"
                " CASE WHEN i < %s THEN 'insert' ELSE 'update' END,"
                f" CASE WHEN i < %s THEN {INSERT_DATA} ELSE {UPDATE_DATA} END,"
                f" CASE WHEN i < %s THEN '{{}}'::jsonb ELSE {UPDATE_META} END, 'bench-web'"
                " FROM generate_series(%s::int, %s::int) i",
                (missions, missions, users, missions, missions, missions, missions, start, end),
            )
