"""The exception tree shared by every package.

One root, a shallow tree, each error carrying the context a person needs to act on it.
"""

from __future__ import annotations


class MissionRunnerError(Exception):
    """Root of every error mission-runner raises on purpose."""


class ConfigurationError(MissionRunnerError):
    """A setting is missing or wrong. `setting` names the environment variable to change."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


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
    """The replication connection, slot or publication is not usable as it is."""

    def __init__(self, message: str, *, slot: str | None = None, hint: str | None = None) -> None:
        text = message if hint is None else f"{message}\n  fix: {hint}"
        super().__init__(text)
        self.slot = slot
        self.hint = hint


class SetupError(ReplicationError):
    """The database is not set up the way we need (table, publication, privileges, slot
    owner). Fatal at start; the message says what to change."""


class SlotLostError(ReplicationError):
    """The slot is missing or invalidated: the stream has a gap and must be rebuilt."""


class SlotInUseError(ReplicationError):
    """Another process holds the slot (another instance, or a stale walsender)."""


class ConnectionLostError(ReplicationError):
    """The replication connection broke; reconnecting may help."""


class PersistenceError(MissionRunnerError):
    """Snapshots, checkpoint or dead letters could not be written or read."""


class PlannerError(MissionRunnerError):
    """The planner failed. `kind` is the provider's error kind (or ours: unreachable, timeout)."""

    def __init__(self, kind: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retryable = retryable


class WriterError(MissionRunnerError):
    """An append to the database failed."""
