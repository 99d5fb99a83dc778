"""When to write the next group commit: a pure timing policy (no I/O, time passed in).

Snapshot changes are written soon after they are applied, batched: after
`max_transactions` transactions or `max_rows` rows, or `max_delay` after the first change not
yet written, whichever comes first. A checkpoint that only moved over transactions that
changed nothing (heartbeats, markers, a confirmed keepalive position) is written lazily,
`checkpoint_delay` later. And persisting never takes more than about 1/`DUTY` of the time:
the next write is due no sooner than `DUTY` times the cost of the last one after it ended.
Idle or lightly loaded, writes take milliseconds and the delay stays `max_delay`; catching
up, batches grow instead of the same records being written again and again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GroupCommitOptions:
    max_transactions: int = 5000
    max_rows: int = 50_000
    max_delay: float = 0.2
    checkpoint_delay: float = 10.0
    serialize_chunk: int = 1000
    """Records serialised per step of the event loop (bounds how long one step holds it)."""


class GroupCommit:
    DUTY = 8

    __slots__ = (
        "_checkpoint_due",
        "_first_pending",
        "_last_cost",
        "_last_end",
        "_rows",
        "_tx",
        "options",
    )

    def __init__(self, options: GroupCommitOptions) -> None:
        self.options = options
        self._tx = 0
        self._rows = 0
        self._first_pending: float | None = None
        self._checkpoint_due: float | None = None
        self._last_end = 0.0
        self._last_cost = 0.0

    def note_change(self, now: float, rows: int) -> None:
        """A transaction (or load) changed snapshots."""
        self._tx += 1
        self._rows += rows
        if self._first_pending is None:
            self._first_pending = now

    def note_checkpoint(self, now: float) -> None:
        """Only the applied position moved."""
        if self._checkpoint_due is None:
            self._checkpoint_due = now + self.options.checkpoint_delay

    def full(self) -> bool:
        o = self.options
        return self._tx >= o.max_transactions or self._rows >= o.max_rows

    def deadline(self) -> float | None:
        """When the next write is due (monotonic seconds); None: nothing to write."""
        floor = self._last_end + self.DUTY * self._last_cost
        if self._first_pending is not None:
            if self.full():
                return floor
            return max(self._first_pending + self.options.max_delay, floor)
        if self._checkpoint_due is None:
            return None
        return max(self._checkpoint_due, floor)

    def taken(self) -> None:
        """Everything noted so far went into a batch."""
        self._tx = 0
        self._rows = 0
        self._first_pending = None
        self._checkpoint_due = None

    def persisted(self, started: float, ended: float) -> None:
        self._last_end = ended
        self._last_cost = ended - started
