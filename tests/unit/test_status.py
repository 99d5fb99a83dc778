"""The `status` command's lag, as far as it can be known from outside the service."""

from __future__ import annotations

from mission_runner.status import CheckpointStatus, _lag

NOW = 1_776_254_400_000_000
HOUR = 3_600_000_000


def test_nothing_unconfirmed_is_zero_whatever_the_age_of_the_last_commit() -> None:
    old = CheckpointStatus(lsn="0/1", commit_time_us=NOW - 10 * HOUR, epoch=1)
    assert _lag(0, old, NOW)[:2] == (0.0, 0.0)


def test_unconfirmed_wal_is_unknown_with_the_checkpoint_as_bound() -> None:
    checkpoint = CheckpointStatus(lsn="0/1", commit_time_us=NOW - HOUR, epoch=1)
    seconds, at_most, note = _lag(4096, checkpoint, NOW)
    assert seconds is None and at_most == 3600.0
    assert "4096 bytes" in note and "cannot be known from outside" in note
    none = CheckpointStatus(lsn=None, commit_time_us=None, epoch=None)
    assert _lag(4096, none, NOW)[:2] == (None, None)
    assert _lag(None, none, NOW)[:2] == (None, None)
