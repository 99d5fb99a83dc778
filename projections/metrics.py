"""The projections' metrics: applied transactions and rows, snapshots, group commits.

All on the registry the composition root passes in (tests build a fresh one and read back).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.metrics import LATENCY_BUCKETS


@dataclass(frozen=True, slots=True)
class SnapshotMetrics:
    transactions: Counter
    skipped_transactions: Counter
    rows: Counter
    dead_letters: Counter
    invalid_stamps: Counter
    commit_to_apply: Histogram
    snapshots: Gauge
    snapshots_new: Counter
    snapshots_updated: Counter
    rows_applied: Counter
    checkpoint_lsn: Gauge
    persist_batches: Counter
    persist_seconds: Histogram
    persist_errors: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> SnapshotMetrics:
        r = registry
        return cls(
            transactions=Counter(
                "mana_ai_stream_transactions",
                "Committed transactions applied from the stream",
                registry=r,
            ),
            skipped_transactions=Counter(
                "mana_ai_stream_skipped_transactions",
                "Re-sent transactions skipped because they were applied before",
                registry=r,
            ),
            rows=Counter(
                "mana_ai_stream_rows",
                "Rows applied from the stream or a load",
                ["table"],
                registry=r,
            ),
            dead_letters=Counter(
                "mana_ai_stream_dead_letters",
                "Rows that could not be applied",
                ["reason"],
                registry=r,
            ),
            invalid_stamps=Counter(
                "mana_ai_invalid_field_stamps",
                "Field stamps that were not valid instants (created_at used instead)",
                registry=r,
            ),
            commit_to_apply=Histogram(
                "mana_ai_commit_to_apply_seconds",
                "From a transaction's commit on the server to its application in memory",
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            snapshots=Gauge("mana_ai_snapshots", "Live snapshots in memory", ["kind"], registry=r),
            snapshots_new=Counter(
                "mana_ai_snapshots_new", "Records seen for the first time", registry=r
            ),
            snapshots_updated=Counter(
                "mana_ai_snapshots_updated", "Snapshot changes applied", registry=r
            ),
            rows_applied=Counter(
                "mana_ai_snapshot_rows_applied", "Rows merged into snapshots", registry=r
            ),
            checkpoint_lsn=Gauge(
                "mana_ai_checkpoint_lsn",
                "Persisted checkpoint (end LSN of the last applied transaction), as a number",
                registry=r,
            ),
            persist_batches=Counter(
                "mana_ai_persist_batches", "Group commits of snapshots and checkpoint", registry=r
            ),
            persist_seconds=Histogram(
                "mana_ai_persist_seconds",
                "Duration of one group commit",
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            persist_errors=Counter(
                "mana_ai_persist_errors",
                "Group commits that failed (transient ones are retried)",
                ["kind"],
                registry=r,
            ),
        )
