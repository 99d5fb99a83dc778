"""Prometheus metrics, all on an injected registry (tests build a fresh one and read back).

Names follow the predecessor where the concept carries over (domain.md §8).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Stream
        self.stream_transactions = Counter(
            "mana_ai_stream_transactions",
            "Committed transactions applied from the stream",
            registry=r,
        )
        self.stream_skipped_transactions = Counter(
            "mana_ai_stream_skipped_transactions",
            "Re-sent transactions skipped because they were applied before",
            registry=r,
        )
        self.stream_rows = Counter(
            "mana_ai_stream_rows",
            "Rows applied from the stream or a load",
            ["table"],
            registry=r,
        )
        self.dead_letters = Counter(
            "mana_ai_stream_dead_letters",
            "Rows that could not be applied",
            ["reason"],
            registry=r,
        )
        self.invalid_stamps = Counter(
            "mana_ai_invalid_field_stamps",
            "Field stamps that were not valid instants (created_at used instead)",
            registry=r,
        )
        self.rebuilds = Counter(
            "mana_ai_stream_rebuilds",
            "Gap-free rebuilds from the table",
            ["reason"],
            registry=r,
        )
        self.reconnects = Counter(
            "mana_ai_stream_reconnects",
            "Replication reconnects",
            ["error"],
            registry=r,
        )
        self.checkpoint_lsn = Gauge(
            "mana_ai_checkpoint_lsn",
            "Persisted checkpoint (end LSN of the last applied transaction), as a number",
            registry=r,
        )
        self.persist_batches = Counter(
            "mana_ai_persist_batches",
            "Group commits of snapshots and checkpoint",
            registry=r,
        )
        self.persist_seconds = Histogram(
            "mana_ai_persist_seconds",
            "Duration of one group commit",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.commit_to_apply = Histogram(
            "mana_ai_commit_to_apply_seconds",
            "From a transaction's commit on the server to its application in memory",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.streaming = Gauge(
            "mana_ai_stream_connected",
            "1 while this instance streams from the slot",
            registry=r,
        )
        # Snapshots
        self.snapshots = Gauge(
            "mana_ai_snapshots",
            "Live snapshots in memory",
            ["kind"],
            registry=r,
        )
        self.snapshots_new = Counter(
            "mana_ai_snapshots_new",
            "Records seen for the first time",
            registry=r,
        )
        self.snapshots_updated = Counter(
            "mana_ai_snapshots_updated",
            "Snapshot changes applied",
            registry=r,
        )
        self.snapshot_rows_applied = Counter(
            "mana_ai_snapshot_rows_applied",
            "Rows merged into snapshots",
            registry=r,
        )
        # Replication lag, read from the slot
        self.lag_bytes = Gauge(
            "mana_ai_replication_lag_bytes",
            "Server WAL position minus the slot's confirmed flush position",
            registry=r,
        )
        self.retained_wal_bytes = Gauge(
            "mana_ai_replication_retained_wal_bytes",
            "WAL the slot keeps (server WAL position minus restart_lsn)",
            registry=r,
        )
        self.safe_wal_bytes = Gauge(
            "mana_ai_replication_safe_wal_bytes",
            "WAL that can still be written before the slot is invalidated (-1: unlimited)",
            registry=r,
        )
        self.wal_status = Gauge(
            "mana_ai_replication_wal_status",
            "The slot's wal_status (1 for the current one)",
            ["status"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "mana_ai_replication_lag_seconds",
            "Now minus the commit time of the last applied transaction; 0 when caught up",
            registry=r,
        )
        self.spill_bytes = Gauge(
            "mana_ai_replication_spill_bytes",
            "Bytes the server spilled to disk decoding for the slot (pg_stat_replication_slots)",
            registry=r,
        )
        self.stream_bytes = Gauge(
            "mana_ai_replication_stream_bytes",
            "Bytes of in-progress transactions streamed to us (pg_stat_replication_slots)",
            registry=r,
        )
        # Mission runtime
        self.due_queue = Gauge(
            "mana_ai_due_queue",
            "Missions scheduled in the due index",
            registry=r,
        )
        self.in_flight = Gauge(
            "mana_ai_plans_in_flight",
            "Missions being planned or written back now",
            registry=r,
        )
        self.agent_decisions = Counter(
            "mana_ai_agent_decisions",
            "Gate decisions for due missions of an agent",
            ["decision"],
            registry=r,
        )
        self.dispatch_delay = Histogram(
            "mana_ai_dispatch_delay_seconds",
            "From a mission's nextRunAt to the planner start",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.plans_produced = Counter(
            "mana_ai_plans_produced",
            "Plans the planner produced",
            registry=r,
        )
        self.plans_written_back = Counter(
            "mana_ai_plans_written_back",
            "Iterations appended to sync_changes",
            registry=r,
        )
        self.mission_errors = Counter(
            "mana_ai_mission_errors",
            "Dispatches that ended in an error or a failed iteration",
            registry=r,
        )
        self.parse_failures = Counter(
            "mana_ai_parse_failures",
            "Tool calls from the planner that could not be used",
            registry=r,
        )
        self.tokens_used = Counter(
            "mana_ai_tokens_used",
            "Planner tokens used per agent",
            ["agent_id"],
            registry=r,
        )
        self.tool_calls = Counter(
            "mana_ai_tool_calls",
            "Tool calls proposed by the planner",
            ["tool", "policy", "outcome"],
            registry=r,
        )
        self.planner_rounds = Histogram(
            "mana_ai_planner_rounds",
            "Planner rounds per plan",
            registry=r,
            buckets=(1, 2, 3, 4, 5),
        )
        self.provider_errors = Counter(
            "mana_ai_provider_errors",
            "Planner provider errors",
            ["provider", "kind"],
            registry=r,
        )
        # HTTP
        self.http_requests = Counter(
            "mana_ai_http_requests",
            "HTTP requests served",
            ["method", "path", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "mana_ai_http_request_duration_seconds",
            "HTTP request duration",
            ["path"],
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
