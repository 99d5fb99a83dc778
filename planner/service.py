"""Planning one mission: prompt, offered tools, the planner call, and the steps to write back.

The mission runtime calls `MissionPlanner.plan_mission` with the mission and agent records as
they are in the snapshots. Input resolution (domain.md §7) is a later feature: until then each
input is shown to the planner as a reference without content.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from core.json_types import JsonValue
from planner.catalog import Catalog
from planner.gates import GateResult
from planner.loop import CallRecord, Planner, PlanRequest
from planner.policy import offered_tools
from planner.prompt import ResolvedInput, build_prompt
from writer.iterations import PlanStep

_UNRESOLVED = "(content not available to the server planner)"


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    summary: str
    steps: tuple[PlanStep, ...]
    tokens: int
    rounds: int
    provider: str
    parse_failures: int = 0
    calls: tuple[CallRecord, ...] = ()


class MissionPlanner(Protocol):
    name: str

    async def plan_mission(
        self,
        mission: Mapping[str, JsonValue],
        agent: Mapping[str, JsonValue] | None,
        gate: GateResult,
    ) -> PlanOutcome: ...


def input_references(mission: Mapping[str, JsonValue]) -> tuple[ResolvedInput, ...]:
    raw = mission.get("inputs")
    if not isinstance(raw, list):
        return ()
    out = []
    for item in raw:
        if isinstance(item, dict):
            module, table, ident = item.get("module"), item.get("table"), item.get("id")
            if isinstance(module, str) and isinstance(table, str) and isinstance(ident, str):
                out.append(ResolvedInput(module, table, ident, _UNRESOLVED))
    return tuple(out)


class CatalogPlanner:
    """Builds the request from the catalog and the agent's policy; delegates the call."""

    def __init__(self, *, planner: Planner, catalog: Catalog, name: str) -> None:
        self.planner = planner
        self.catalog = catalog
        self.name = name

    async def plan_mission(
        self,
        mission: Mapping[str, JsonValue],
        agent: Mapping[str, JsonValue] | None,
        gate: GateResult,
    ) -> PlanOutcome:
        mission_json: JsonValue = dict(mission)
        agent_json: JsonValue = dict(agent) if agent is not None and gate.gated else None
        prompt = build_prompt(
            mission=mission_json, agent=agent_json, inputs=input_references(mission)
        )
        policy = agent.get("policy") if agent is not None and gate.gated else None
        tools = offered_tools(self.catalog, policy)
        request = PlanRequest(messages=prompt.messages, tools=tools, brief=prompt.brief)
        result = await self.planner.plan(request)
        return PlanOutcome(
            summary=result.summary,
            steps=result.steps,
            tokens=result.usage.total_tokens,
            rounds=result.rounds,
            provider=result.provider,
            parse_failures=result.parse_failures,
            calls=result.calls,
        )
