"""Tool policy: which catalog tools an agent's planner call may offer (domain.md §4, §5).

An agent's `policy` record field is `{tools: {name: decision}, defaultsByModule: {module:
decision}, defaultForAi: decision}` with decision in `auto | propose | deny`. A tool's policy
resolves `tools[name]` -> `defaultsByModule[module]` -> `defaultForAi` -> the catalog's
`defaultPolicy` (used only when the agent sets nothing that applies).

The policy arrives as whatever JSON the web app wrote, so parsing is total: a policy that is not
an object, a section that is not an object, a key that is not a string or a decision that is not
exactly `auto`, `propose` or `deny` is *ignored* (as if that entry were absent) and counted in
`AgentPolicy.ignored`. The result depends only on the input, never on dict order beyond what the
JSON says, so the same record always offers the same tools.

Offering (§5): only tools whose catalog `defaultPolicy` is `propose` are offered server-side
(`auto` tools run on the client without review, `deny` tools never run), minus those the agent's
policy resolves to `deny`. Each offered tool carries its resolved decision as a metrics label.
Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from core.json_types import JsonValue
from planner.catalog import Catalog, Decision, ToolSpec, as_decision
from writer.iterations import PlanStep


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """A parsed agent policy. Empty mappings / None mean "not set"."""

    tools: Mapping[str, Decision] = field(default_factory=dict)
    defaults_by_module: Mapping[str, Decision] = field(default_factory=dict)
    default_for_ai: Decision | None = None
    ignored: int = 0
    """How many malformed entries parsing ignored (for a log line or metric, never fatal)."""

    def resolve(self, tool: ToolSpec) -> Decision:
        """The decision for `tool`, by the precedence of domain.md §4."""
        decision = self.tools.get(tool.name)
        if decision is None:
            decision = self.defaults_by_module.get(tool.module)
        if decision is None:
            decision = self.default_for_ai
        return tool.default_policy if decision is None else decision


EMPTY_POLICY = AgentPolicy()
"""The policy of an agent that sets nothing (and of the legacy default agent)."""


def parse_policy(raw: JsonValue) -> AgentPolicy:
    """Parse an agent's `policy` field; malformed parts are ignored (see the module doc)."""
    if raw is None:
        return EMPTY_POLICY
    if not isinstance(raw, dict):
        return AgentPolicy(ignored=1)
    ignored = 0
    tools, bad = _decision_map(raw.get("tools"))
    ignored += bad
    by_module, bad = _decision_map(raw.get("defaultsByModule"))
    ignored += bad
    default_for_ai: Decision | None = None
    if "defaultForAi" in raw and raw["defaultForAi"] is not None:
        default_for_ai = as_decision(raw["defaultForAi"])
        if default_for_ai is None:
            ignored += 1
    return AgentPolicy(
        tools=tools,
        defaults_by_module=by_module,
        default_for_ai=default_for_ai,
        ignored=ignored,
    )


def _decision_map(section: JsonValue) -> tuple[dict[str, Decision], int]:
    """A `{key: decision}` section and how many entries were ignored.

    Absent or null: empty, nothing ignored. Not an object: empty, one ignored. Entries with a
    value that is not a decision are dropped one by one (JSON object keys are always strings).
    """
    if section is None:
        return {}, 0
    if not isinstance(section, dict):
        return {}, 1
    out: dict[str, Decision] = {}
    ignored = 0
    for key, value in section.items():
        decision = as_decision(value)
        if decision is None:
            ignored += 1
        else:
            out[key] = decision
    return out, ignored


@dataclass(frozen=True, slots=True)
class OfferedTool:
    """A tool offered to the planner, with the agent's resolved decision for it."""

    spec: ToolSpec
    policy: Decision

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def module(self) -> str:
        return self.spec.module

    def step(self, params: dict[str, JsonValue]) -> PlanStep:
        """The plan step of one call of this tool with `params`, with its summary line."""
        return PlanStep(
            tool_name=self.name,
            params=params,
            summary=step_summary(self.spec.description, self.name, params),
            module=self.module,
            policy=self.policy,
        )


def step_summary(description: str, tool_name: str, params: dict[str, JsonValue]) -> str:
    """A one-line summary of a proposed tool call for the iteration's plan: the first
    sentence of the tool's description and up to three parameters."""
    shown = []
    for key, value in list(params.items())[:3]:
        text = value if isinstance(value, str) else repr(value)
        if len(text) > 60:
            text = text[:57] + "..."
        shown.append(f"{key}: {text}")
    head = description.split(".")[0].strip() or tool_name
    return f"{head} ({', '.join(shown)})" if shown else head


def offered_tools(catalog: Catalog, policy: AgentPolicy | JsonValue) -> tuple[OfferedTool, ...]:
    """The tools one planner call offers, in catalog order.

    `policy` is a parsed `AgentPolicy` or the raw `policy` field of the agent record (None for
    missions without an agent: nothing is denied then).

    The resolved decision is `propose` or `auto` (never `deny`): an agent may mark a `propose`
    tool `auto`, which is still offered as a proposal server-side; the label tells the client.
    """
    parsed = policy if isinstance(policy, AgentPolicy) else parse_policy(policy)
    offered: list[OfferedTool] = []
    for tool in catalog:
        if tool.default_policy != "propose":
            continue
        decision = parsed.resolve(tool)
        if decision == "deny":
            continue
        offered.append(OfferedTool(spec=tool, policy=decision))
    return tuple(offered)

