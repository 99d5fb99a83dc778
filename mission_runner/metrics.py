"""All metrics of the process, on one injected registry (tests build a fresh one and read
back): each layer defines its own, the HTTP surface's are here.

Names follow the predecessor where the concept carries over (domain.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from core.metrics import LATENCY_BUCKETS
from planner.metrics import RuntimeMetrics
from projections.metrics import SnapshotMetrics
from stream.metrics import LagMetrics, StreamMetrics


@dataclass(frozen=True, slots=True)
class HttpMetrics:
    requests: Counter
    duration: Histogram

    @classmethod
    def register(cls, registry: CollectorRegistry) -> HttpMetrics:
        return cls(
            requests=Counter(
                "mana_ai_http_requests",
                "HTTP requests served",
                ["method", "path", "status"],
                registry=registry,
            ),
            duration=Histogram(
                "mana_ai_http_request_duration_seconds",
                "HTTP request duration",
                ["path"],
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
        )


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.stream = StreamMetrics.register(self.registry)
        self.lag = LagMetrics.register(self.registry)
        self.snapshots = SnapshotMetrics.register(self.registry)
        self.runtime = RuntimeMetrics.register(self.registry)
        self.http = HttpMetrics.register(self.registry)
