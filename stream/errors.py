"""Errors of the replication layer.

"The peer broke the protocol" (`DecodeError`) and "we broke it" (`ProtocolUsageError`) are
different errors; the I/O shells translate psycopg's exceptions into these at the boundary,
classified by SQLSTATE and by what the server reports about the slot, never by message text.
"""

from __future__ import annotations

from core.errors import MissionRunnerError


class DecodeError(MissionRunnerError):
    """The server sent bytes we cannot decode exactly (the peer broke the protocol).

    `lsn` is the WAL position of the frame or message, `tag` its one-letter type.
    """

    def __init__(self, reason: str, *, lsn: int | None = None, tag: str | None = None) -> None:
        where = []
        if tag is not None:
            where.append(f"tag {tag!r}")
        if lsn is not None:
            where.append(f"at LSN {lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}")
        suffix = f" ({', '.join(where)})" if where else ""
        super().__init__(f"{reason}{suffix}")
        self.reason = reason
        self.lsn = lsn
        self.tag = tag


class ProtocolUsageError(MissionRunnerError):
    """Our own code misused a protocol object (we broke the protocol, not the peer)."""


class ReplicationError(MissionRunnerError):
    """The replication connection, slot or publication is not usable as it is.

    `sqlstate` is the server's error code when the server reported the error."""

    def __init__(
        self,
        message: str,
        *,
        slot: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.slot = slot
        self.sqlstate = sqlstate


class SlotLostError(ReplicationError):
    """The slot is missing or invalidated: the stream has a gap and must be rebuilt."""


class SlotInUseError(ReplicationError):
    """Another process holds the slot (another instance, or a stale walsender)."""


class ConnectionLostError(ReplicationError):
    """The replication connection broke, or the server is not reachable; retrying may help."""


class LeadershipLost(MissionRunnerError):
    """This instance no longer holds the leader lock (its session ended, or a newer leader
    took over): stop streaming, persisting and dispatching, and wait to lead again."""
