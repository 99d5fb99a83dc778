"""The stream layer's metrics: the session (leadership, streaming, reconnects, rebuilds)
and replication lag, on the registry the composition root passes in."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    streaming: Gauge
    leader: Gauge
    leader_epoch: Gauge
    leadership_lost: Counter
    reconnects: Counter
    rebuilds: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> StreamMetrics:
        r = registry
        return cls(
            streaming=Gauge(
                "mana_ai_stream_connected",
                "1 while this instance streams from the slot",
                registry=r,
            ),
            leader=Gauge(
                "mana_ai_leader", "1 while this instance holds the slot's leader lock", registry=r
            ),
            leader_epoch=Gauge(
                "mana_ai_leader_epoch",
                "The fencing token of this instance's current term as leader (0: not leading)",
                registry=r,
            ),
            leadership_lost=Counter(
                "mana_ai_leadership_lost",
                "Terms that ended because the leader lock or its fence was lost",
                registry=r,
            ),
            reconnects=Counter(
                "mana_ai_stream_reconnects", "Replication reconnects", ["error"], registry=r
            ),
            rebuilds=Counter(
                "mana_ai_stream_rebuilds",
                "Gap-free rebuilds from the table",
                ["reason"],
                registry=r,
            ),
        )


@dataclass(frozen=True, slots=True)
class LagMetrics:
    lag_bytes: Gauge
    lag_seconds: Gauge
    retained_wal_bytes: Gauge
    safe_wal_bytes: Gauge
    wal_status: Gauge
    spill_bytes: Gauge
    stream_bytes: Gauge

    @classmethod
    def register(cls, registry: CollectorRegistry) -> LagMetrics:
        r = registry
        return cls(
            lag_bytes=Gauge(
                "mana_ai_replication_lag_bytes",
                "Server WAL position minus the slot's confirmed flush position",
                registry=r,
            ),
            lag_seconds=Gauge(
                "mana_ai_replication_lag_seconds",
                "How far behind the snapshots may be: 0 when everything the server had"
                " committed at the last sample is applied, else now minus the latest moment up"
                " to which the snapshots are known complete",
                registry=r,
            ),
            retained_wal_bytes=Gauge(
                "mana_ai_replication_retained_wal_bytes",
                "WAL the slot keeps (server WAL position minus restart_lsn)",
                registry=r,
            ),
            safe_wal_bytes=Gauge(
                "mana_ai_replication_safe_wal_bytes",
                "WAL that can still be written before the slot is invalidated (-1: unlimited)",
                registry=r,
            ),
            wal_status=Gauge(
                "mana_ai_replication_wal_status",
                "The slot's wal_status (1 for the current one)",
                ["status"],
                registry=r,
            ),
            spill_bytes=Gauge(
                "mana_ai_replication_spill_bytes",
                "Bytes the server spilled to disk decoding for the slot"
                " (pg_stat_replication_slots)",
                registry=r,
            ),
            stream_bytes=Gauge(
                "mana_ai_replication_stream_bytes",
                "Bytes of in-progress transactions streamed to us (pg_stat_replication_slots)",
                registry=r,
            ),
        )
