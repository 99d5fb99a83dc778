"""Replication lag in seconds (`stream.lag`): one definition, checked on the cases that the
earlier definitions got wrong."""

from __future__ import annotations

from core.lsn import Lsn
from stream.lag import LagTracker, stuck

S = 1_000_000
NOW = 1_776_254_400 * S
HOUR = 3600 * S


def test_catching_up_a_backlog_reads_the_age_of_what_is_applied() -> None:
    lag = LagTracker()
    lag.sample(Lsn(10_000), NOW)  # the server at start: far ahead of us
    # Applying transactions committed two hours ago, then one hour ago: not "near 0".
    assert lag.seconds(Lsn(1_000), NOW - 2 * HOUR, NOW) == 7200
    assert lag.seconds(Lsn(5_000), NOW - HOUR, NOW + 10 * S) == 3610
    # Past the position sampled at start: everything then committed is applied.
    assert lag.seconds(Lsn(10_000), NOW - HOUR, NOW + 20 * S) == 0


def test_idle_with_other_tables_wal_reads_the_sample_interval_not_the_last_commit() -> None:
    lag = LagTracker()
    last_commit = NOW - 10 * HOUR  # nothing of ours committed for ten hours
    # The server's WAL grows (other tables); keepalives move our position after it.
    for k in range(1, 6):
        lag.sample(Lsn(1000 * k), NOW + k * 5 * S)
    # Applied up to the fourth sample, not yet the fifth (taken at +25 s), read at +27 s.
    assert lag.seconds(Lsn(4000), last_commit, NOW + 27 * S) == 7
    assert lag.seconds(Lsn(5000), last_commit, NOW + 28 * S) == 0


def test_a_restart_behind_a_backlog_is_seeded_from_the_checkpoint() -> None:
    lag = LagTracker()
    checkpoint_commit = NOW - 2 * HOUR
    lag.sample(Lsn(9_000), NOW)  # first sample, at start
    assert lag.seconds(Lsn(100), checkpoint_commit, NOW + S) == 7201
    # Nothing was committed meanwhile (a quiet night): the first keepalive makes it 0.
    assert lag.seconds(Lsn(9_000), checkpoint_commit, NOW + 2 * S) == 0


def test_unknown_only_without_sample_and_commit_time() -> None:
    lag = LagTracker()
    assert lag.seconds(Lsn(0), None, NOW) is None
    assert lag.seconds(Lsn(0), NOW - S, NOW) == 1
    lag.sample(Lsn(0), NOW)
    assert lag.seconds(Lsn(0), None, NOW) == 0


def test_a_passed_sample_is_credited_once_and_reset_forgets() -> None:
    lag = LagTracker()
    lag.sample(Lsn(100), NOW)
    lag.sample(Lsn(200), NOW + 5 * S)
    assert lag.seconds(Lsn(150), None, NOW + 6 * S) == 6  # since the first sample
    lag.reset()
    assert lag.seconds(Lsn(150), None, NOW + 6 * S) is None


def test_overflowing_samples_err_high() -> None:
    lag = LagTracker(max_pending=2)
    for k in range(5):
        lag.sample(Lsn(100 * (k + 1)), NOW + k * S)
    # The dropped samples' moments are never credited: at most later ones are.
    assert lag.seconds(Lsn(300), NOW - S, NOW + 10 * S) == 11


def test_stuck_needs_both_growth_and_silence() -> None:
    assert stuck(server_lsn=Lsn(200), received=Lsn(100), silent_for=61, max_silence=60)
    assert not stuck(server_lsn=Lsn(200), received=Lsn(100), silent_for=59, max_silence=60)
    assert not stuck(server_lsn=Lsn(100), received=Lsn(100), silent_for=600, max_silence=60)
    assert not stuck(server_lsn=None, received=Lsn(100), silent_for=600, max_silence=60)
