"""Replication lag in seconds, and whether the stream is stuck: one definition, pure (the
positions and times are passed in).

Lag in seconds is how far behind the snapshots may be:
- 0 when everything the server had written at the last sample of its WAL position is
  applied (the applied position, which idle keepalives also move, has passed that sample);
- otherwise now minus the latest moment up to which the snapshots are known complete: the
  later of the last applied transaction's commit time (everything committed before it is
  applied: commit order) and the time of the newest WAL sample the applied position has
  passed (everything written before that moment is applied).

The commit time is seeded at boot from the checkpoint, so a restart behind a backlog reads
hours, not "0 s behind"; the first sample is taken at start, so after a quiet night the
service reads 0 as soon as the stream has confirmed the server's position, not the age of
the last transaction. Unknown (None) only before the first sample with no commit time.

The stream is stuck when the server's WAL has grown past what this instance has received and
nothing (no data, no keepalive) arrived for `max_silence` seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from core.lsn import Lsn


@dataclass(frozen=True, slots=True)
class WalSample:
    lsn: Lsn
    """The server's WAL position (`pg_current_wal_lsn()`)..."""
    at_us: int
    """...at this wall-clock time."""


class LagTracker:
    """Server WAL samples not yet passed by the applied position, oldest first."""

    def __init__(self, max_pending: int = 10_000) -> None:
        self._pending: deque[WalSample] = deque()
        self._max_pending = max_pending
        self._passed_at_us: int | None = None
        self.last: WalSample | None = None

    def reset(self) -> None:
        """Forget the samples (a new term streams from the persisted position)."""
        self._pending.clear()
        self._passed_at_us = None
        self.last = None

    def sample(self, lsn: Lsn, at_us: int) -> None:
        sample = WalSample(lsn, at_us)
        self.last = sample
        self._pending.append(sample)
        if len(self._pending) > self._max_pending:
            self._pending.popleft()  # its moment is never credited: the figure errs high

    def seconds(self, applied: Lsn, commit_time_us: int | None, now_us: int) -> float | None:
        """The lag (see the module docstring)."""
        pending = self._pending
        while pending and pending[0].lsn <= applied:
            at = pending.popleft().at_us
            if self._passed_at_us is None or at > self._passed_at_us:
                self._passed_at_us = at
        if self.last is not None and not pending:
            return 0.0
        known = max(
            (t for t in (commit_time_us, self._passed_at_us) if t is not None), default=None
        )
        if known is None:
            return None
        return max(0.0, (now_us - known) / 1_000_000)


def stuck(
    *,
    server_lsn: Lsn | None,
    received: Lsn,
    silent_for: float,
    max_silence: float,
) -> bool:
    """The server's WAL (as last sampled) is past what we received, and the stream has been
    silent for longer than `max_silence` seconds."""
    return server_lsn is not None and server_lsn > received and silent_for > max_silence
