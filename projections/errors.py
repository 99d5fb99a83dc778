"""Errors of the projections layer."""

from __future__ import annotations

from core.errors import MissionRunnerError


class PersistenceError(MissionRunnerError):
    """Snapshots, checkpoint or dead letters could not be written or read, and waiting will
    not help (a privilege or schema problem, data the server refuses). `sqlstate` is the
    server's error code."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
