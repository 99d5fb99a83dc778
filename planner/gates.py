"""The gates a due mission passes before it is planned (domain.md §4, in that order). Pure.

1. `agentId` set but the agent is missing or deleted → run as the legacy default agent, ungated.
2. agent `archived` → `skipped-archived`.
3. agent `paused` → `skipped-paused`.
4. the agent already has `maxConcurrentMissions` plans in flight → `skipped-concurrency`
   (Decision: a live limit on in-flight planner calls; the mission runs when a slot frees).
5. `maxTokensPerDay` is a number >= 0 and the agent's tokens in the last 24 h >= it →
   `skipped-budget` (0 blocks everything).
6. → `ran`.
Missions without an agent (and those falling back to the legacy agent) emit no decision metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from core.json_types import JsonValue

LEGACY_AGENT_ID: Final = "legacy:ai-default"
LEGACY_AGENT_NAME: Final = "Mana"
DEFAULT_MAX_CONCURRENT: Final = 1


class GateDecision(StrEnum):
    RAN = "ran"
    SKIPPED_ARCHIVED = "skipped-archived"
    SKIPPED_PAUSED = "skipped-paused"
    SKIPPED_CONCURRENCY = "skipped-concurrency"
    SKIPPED_BUDGET = "skipped-budget"


@dataclass(frozen=True, slots=True)
class GateResult:
    decision: GateDecision
    agent_id: str  # the agent that runs it (LEGACY_AGENT_ID when falling back)
    agent_name: str
    gated: bool  # False for the legacy agent: no limits, no decision metric

    @property
    def runs(self) -> bool:
        return self.decision is GateDecision.RAN


def max_concurrent(agent: Mapping[str, JsonValue]) -> int:
    value = agent.get("maxConcurrentMissions")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return DEFAULT_MAX_CONCURRENT


def token_cap(agent: Mapping[str, JsonValue]) -> int | None:
    value = agent.get("maxTokensPerDay")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value >= 0 else None


def _legacy() -> GateResult:
    return GateResult(GateDecision.RAN, LEGACY_AGENT_ID, LEGACY_AGENT_NAME, gated=False)


def decide(
    mission: Mapping[str, JsonValue],
    agent: Mapping[str, JsonValue] | None,
    *,
    in_flight: int,
    tokens_last_24h: int,
) -> GateResult:
    """`agent` is the live agent view for the mission's `agentId` (None: missing/deleted)."""
    agent_id = mission.get("agentId")
    if not isinstance(agent_id, str) or not agent_id or agent is None:
        return _legacy()
    name = agent.get("name")
    display = name if isinstance(name, str) and name else agent_id
    state = agent.get("state")
    if state == "archived":
        return GateResult(GateDecision.SKIPPED_ARCHIVED, agent_id, display, gated=True)
    if state == "paused":
        return GateResult(GateDecision.SKIPPED_PAUSED, agent_id, display, gated=True)
    if in_flight >= max_concurrent(agent):
        return GateResult(GateDecision.SKIPPED_CONCURRENCY, agent_id, display, gated=True)
    cap = token_cap(agent)
    if cap is not None and tokens_last_24h >= cap:
        return GateResult(GateDecision.SKIPPED_BUDGET, agent_id, display, gated=True)
    return GateResult(GateDecision.RAN, agent_id, display, gated=True)
