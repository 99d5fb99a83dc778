"""Prompt building for the planner call (domain.md §5): a pure function of records.

`build_prompt` turns a mission record, its agent record (both plain JSON as they come from the
snapshots) and the already-resolved input blocks into two messages:
- system: the behaviour frame (the server plans and never executes; tool calls are proposals;
  be concise), then `<agent_persona>` from the agent's `name`/`role`/`systemPrompt` and
  `<agent_memory>` from its `memory`, each only when there is plaintext for it;
- user: the mission title, concept (`conceptMarkdown`), objective, one block per resolved input,
  and the last 3 iterations with their steps and the user's feedback.

Invariants:
- No ciphertext reaches a prompt. Any string value that starts with `enc:` (after leading
  whitespace) is skipped wherever it occurs: a field, a list element, a nested step parameter,
  even a dict key. Skipping is silent; the section is left out or says it has no readable content.
- Records are untrusted JSON: a missing field, a wrong type or an odd shape is skipped, never an
  exception. Every included text is length-capped, so one huge field cannot crowd out the rest.
- Record text cannot open or close our `<agent_persona>`/`<agent_memory>` tags.
No I/O, no clock, no logging.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.json_types import JsonValue
from planner.chat import Message, SystemMessage, UserMessage

CIPHERTEXT_PREFIX = "enc:"
MAX_ITERATIONS = 3

# Caps, in characters, per included text.
_TITLE = 300
_CONCEPT = 8000
_OBJECTIVE = 2000
_INPUT = 4000
_PERSONA = 4000
_MEMORY = 4000
_SUMMARY = 1000
_FEEDBACK = 1000
_STEP = 300
_PARAMS = 500
_LABEL = 120

_TAG = re.compile(r"<(/?)\s*(agent_persona|agent_memory)", re.IGNORECASE)

FRAME = """\
You are the mission planner of Mana, a personal productivity platform.
You plan; you never execute anything. Each tool call you make is recorded as a proposed step \
that the user reviews and applies in their own app; every call is answered with \
"recorded - pending client application", which does not mean it was carried out.
Propose the few tool calls that best move the mission towards its objective, using only the \
tools offered and arguments that match their parameters. Do not repeat steps that earlier \
iterations already planned unless the user's feedback asks for it; take that feedback into account.
When you are done, answer without tool calls with a short summary of the plan (at most a few \
sentences), in the language of the mission. Be concise."""


@dataclass(frozen=True, slots=True)
class ResolvedInput:
    """One mission input after resolution (decryption happens elsewhere): plaintext `text`."""

    module: str
    table: str
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class MissionBrief:
    """The mission's plaintext title, concept and objective ("" when missing or ciphertext)."""

    title: str
    concept: str
    objective: str


@dataclass(frozen=True, slots=True)
class Prompt:
    system: str
    user: str
    brief: MissionBrief

    @property
    def messages(self) -> tuple[Message, ...]:
        return (SystemMessage(self.system), UserMessage(self.user))


def is_ciphertext(value: object) -> bool:
    """True for a string that is (or may be) field ciphertext: never show it to a model."""
    return isinstance(value, str) and value.lstrip().startswith(CIPHERTEXT_PREFIX)


def mission_brief(mission: JsonValue) -> MissionBrief:
    record = mission if isinstance(mission, dict) else {}
    return MissionBrief(
        title=_plain(record.get("title"), _TITLE),
        concept=_plain(record.get("conceptMarkdown"), _CONCEPT),
        objective=_plain(record.get("objective"), _OBJECTIVE),
    )


def build_prompt(
    *,
    mission: JsonValue,
    agent: JsonValue = None,
    inputs: Sequence[ResolvedInput] = (),
    max_iterations: int = MAX_ITERATIONS,
) -> Prompt:
    """The planner prompt for one mission run (see the module doc)."""
    brief = mission_brief(mission)
    record = mission if isinstance(mission, dict) else {}
    return Prompt(
        system=_system(agent if isinstance(agent, dict) else {}),
        user=_user(brief, inputs, record.get("iterations"), max_iterations),
        brief=brief,
    )


def _system(agent: dict[str, JsonValue]) -> str:
    parts = [FRAME]
    name = _plain(agent.get("name"), _LABEL)
    role = _plain(agent.get("role"), _PERSONA)
    system_prompt = _plain(agent.get("systemPrompt"), _PERSONA)
    if role or system_prompt:
        lines = ["<agent_persona>"]
        if name:
            lines.append(f"Name: {name}")
        if role:
            lines.append(f"Role: {role}")
        if system_prompt:
            lines.append(system_prompt)
        lines.append("</agent_persona>")
        parts.append("\n".join(lines))
    memory = _memory(agent.get("memory"))
    if memory:
        parts.append(f"<agent_memory>\n{memory}\n</agent_memory>")
    return "\n\n".join(parts)


def _memory(value: JsonValue) -> str:
    match value:
        case str():
            return _plain(value, _MEMORY)
        case list():
            items = [_plain(v, _SUMMARY) for v in value]
            return _cap("\n".join(f"- {i}" for i in items if i), _MEMORY)
        case _:
            return ""


def _user(
    brief: MissionBrief,
    inputs: Sequence[ResolvedInput],
    iterations: JsonValue,
    max_iterations: int,
) -> str:
    sections = [f"## Mission\n{brief.title or '(untitled)'}"]
    if brief.concept:
        sections.append(f"## Concept\n{brief.concept}")
    sections.append(f"## Objective\n{brief.objective or '(no objective given)'}")
    if inputs:
        blocks = [_input_block(i, n) for n, i in enumerate(inputs, start=1)]
        sections.append("## Inputs\n" + "\n\n".join(blocks))
    history = _history(iterations, max_iterations)
    if history:
        sections.append(
            f"## Previous iterations (the last {len(history)}, oldest first)\n"
            + "\n\n".join(history)
        )
    else:
        sections.append("## Previous iterations\nNone: this is the first run of this mission.")
    sections.append("Plan the next steps for this mission.")
    return "\n\n".join(sections)


def _input_block(item: ResolvedInput, number: int) -> str:
    ref = "/".join(p for p in (_plain(v, _LABEL) for v in (item.module, item.table, item.id)) if p)
    text = _plain(item.text, _INPUT) or "(no readable content)"
    return f"### Input {number}: {ref or '(unnamed)'}\n{text}"


def _history(iterations: JsonValue, limit: int) -> list[str]:
    if not isinstance(iterations, list) or limit <= 0:
        return []
    valid = [it for it in iterations if isinstance(it, dict)]
    return [_iteration(it) for it in valid[-limit:]]


def _iteration(it: dict[str, JsonValue]) -> str:
    started = _plain(it.get("startedAt"), _LABEL)
    status = _plain(it.get("overallStatus"), _LABEL)
    head = "### Iteration"
    if started:
        head += f" started {started}"
    if status:
        head += f" ({status})"
    lines = [head]
    summary = _plain(it.get("summary"), _SUMMARY)
    if summary:
        lines.append(f"Summary: {summary}")
    plan = it.get("plan")
    steps = [s for s in plan if isinstance(s, dict)] if isinstance(plan, list) else []
    if steps:
        lines.append("Steps:")
        lines.extend(f"{n}. {_step(s)}" for n, s in enumerate(steps, start=1))
    else:
        lines.append("Steps: none")
    feedback = _feedback(it.get("userFeedback"))
    if feedback:
        lines.append(f"User feedback: {feedback}")
    return "\n".join(lines)


def _step(step: dict[str, JsonValue]) -> str:
    status = _plain(step.get("status"), _LABEL) or "unknown"
    intent = step.get("intent")
    call = ""
    if isinstance(intent, dict):
        tool = _plain(intent.get("toolName"), _LABEL)
        if tool:
            params = _scrub(intent.get("params"))
            args = _cap(_json(params), _PARAMS) if isinstance(params, dict) else "{}"
            call = f"{tool} {args}"
    summary = _plain(step.get("summary"), _STEP)
    text = " - ".join(p for p in (call, summary) if p) or "(no details)"
    return f"[{status}] {text}"


def _feedback(value: JsonValue) -> str:
    match value:
        case str():
            return _plain(value, _FEEDBACK)
        case dict() | list():
            scrubbed = _scrub(value)
            return _cap(_json(scrubbed), _FEEDBACK) if scrubbed else ""
        case _:
            return ""


def _plain(value: JsonValue, limit: int) -> str:
    """`value` as prompt text: "" unless it is a plaintext string; trimmed and capped."""
    if not isinstance(value, str) or is_ciphertext(value):
        return ""
    return _cap(_defuse(value.strip()), limit)


def _scrub(value: JsonValue) -> JsonValue:
    """`value` without any ciphertext string, at any depth (keys included); other strings are
    defused. A ciphertext at the top becomes None."""
    match value:
        case str():
            return None if is_ciphertext(value) else _defuse(value)
        case list():
            return [_scrub(v) for v in value if not is_ciphertext(v)]
        case dict():
            return {
                _defuse(k): _scrub(v)
                for k, v in value.items()
                if not is_ciphertext(k) and not is_ciphertext(v)
            }
        case _:
            return value


def _json(value: JsonValue) -> str:
    # The stdlib encoder, not orjson: it accepts every decoded JSON value (orjson refuses
    # integers beyond 64 bits), and its output is deterministic with sort_keys.
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _defuse(text: str) -> str:
    return _TAG.sub(lambda m: f"\u2039{m.group(1)}{m.group(2)}", text)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"
