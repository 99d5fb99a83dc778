"""The mission runtime's and the planner's metrics (names kept from the predecessor where
the concept carries over, domain.md §8), on the registry the composition root passes in."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.metrics import LATENCY_BUCKETS


@dataclass(frozen=True, slots=True)
class RuntimeMetrics:
    due_queue: Gauge
    in_flight: Gauge
    waiting: Gauge
    agent_decisions: Counter
    dispatch_delay: Histogram
    dispatch_failures: Counter
    plans_produced: Counter
    plans_written_back: Counter
    mission_errors: Counter
    parse_failures: Counter
    tokens_used: Counter
    tool_calls: Counter
    planner_rounds: Histogram
    provider_errors: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> RuntimeMetrics:
        r = registry
        return cls(
            due_queue=Gauge("mana_ai_due_queue", "Missions scheduled in the due index", registry=r),
            in_flight=Gauge(
                "mana_ai_plans_in_flight", "Missions being planned or written back now", registry=r
            ),
            waiting=Gauge(
                "mana_ai_plans_waiting",
                "Due missions waiting for a free place under PLANNER_CONCURRENCY",
                registry=r,
            ),
            agent_decisions=Counter(
                "mana_ai_agent_decisions",
                "Gate decisions for due missions of an agent",
                ["decision"],
                registry=r,
            ),
            dispatch_delay=Histogram(
                "mana_ai_dispatch_delay_seconds",
                "From a mission's nextRunAt to the planner start",
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            dispatch_failures=Counter(
                "mana_ai_dispatch_failures",
                "Dispatch attempts that failed outside the planner (database, write-back);"
                " retried with backoff up to PLANNER_MAX_ATTEMPTS",
                ["kind"],
                registry=r,
            ),
            plans_produced=Counter(
                "mana_ai_plans_produced", "Plans the planner produced", registry=r
            ),
            plans_written_back=Counter(
                "mana_ai_plans_written_back", "Iterations appended to sync_changes", registry=r
            ),
            mission_errors=Counter(
                "mana_ai_mission_errors",
                "Dispatches that ended in an error or a failed iteration",
                registry=r,
            ),
            parse_failures=Counter(
                "mana_ai_parse_failures",
                "Tool calls from the planner that could not be used",
                registry=r,
            ),
            tokens_used=Counter(
                "mana_ai_tokens_used", "Planner tokens used per agent", ["agent_id"], registry=r
            ),
            tool_calls=Counter(
                "mana_ai_tool_calls",
                "Tool calls proposed by the planner",
                ["tool", "policy", "outcome"],
                registry=r,
            ),
            planner_rounds=Histogram(
                "mana_ai_planner_rounds",
                "Planner rounds per plan",
                registry=r,
                buckets=(1, 2, 3, 4, 5),
            ),
            provider_errors=Counter(
                "mana_ai_provider_errors",
                "Planner provider errors",
                ["provider", "kind"],
                registry=r,
            ),
        )
