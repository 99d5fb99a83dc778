"""The offline planner: deterministic, uses only offered tools, fills every required parameter."""

from __future__ import annotations

import re
from datetime import date, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import ManualClock
from planner.catalog import Catalog, ToolSpec, load_catalog
from planner.loop import Planner, PlanRequest
from planner.offline import OfflinePlanner, plan_offline
from planner.policy import OfferedTool, offered_tools
from planner.prompt import MissionBrief

CATALOG = load_catalog()
ALL = offered_tools(CATALOG, None)
NOW_US = 1_776_254_400_000_000  # 2026-04-15T12:00:00Z


def _request(
    title: str = "", concept: str = "", objective: str = "", tools: tuple[OfferedTool, ...] = ALL
) -> PlanRequest:
    return PlanRequest((), tools, MissionBrief(title, concept, objective))


async def test_meeting_mission_plans_event_and_task() -> None:
    planner: Planner = OfflinePlanner(clock=ManualClock(now_us=NOW_US))
    result = await planner.plan(
        _request("Prepare the team meeting", "", "Schedule the meeting and create tasks")
    )
    assert [s.tool_name for s in result.steps] == ["create_task", "create_event"]
    event = result.steps[1]
    assert event.params == {
        "title": "Prepare the team meeting",
        "startsAt": "2026-04-16T09:00:00.000Z",
        "durationMinutes": 30,
    }
    assert event.module == "calendar" and event.policy == "propose"
    assert result.provider == "offline" and result.rounds == 0
    assert result.usage.total_tokens == 0
    assert (result.parse_failures, result.rejected_calls) == (0, 0)
    assert result.summary.startswith('Offline plan (no language model is configured) for "Prepare')
    assert "create_task, create_event" in result.summary


async def test_german_journal_mission() -> None:
    result = await OfflinePlanner(clock=ManualClock()).plan(
        _request("Wochenrückblick", "Jeden Sonntag", "Tagebuch schreiben")
    )
    assert result.steps[0].tool_name == "add_journal_entry"
    assert result.steps[0].params == {"content": "Tagebuch schreiben"}


def test_deterministic_and_clock_only_moves_dates() -> None:
    request = _request("Team meeting", "weekly", "schedule it")
    assert plan_offline(request, now_us=NOW_US) == plan_offline(request, now_us=NOW_US)
    later = plan_offline(request, now_us=NOW_US + 86_400_000_000)
    earlier = plan_offline(request, now_us=NOW_US)
    assert [s.tool_name for s in later.steps] == [s.tool_name for s in earlier.steps]
    assert later.steps[0].params["startsAt"] == "2026-04-17T09:00:00.000Z"


def test_no_match_falls_back_to_one_generic_step() -> None:
    result = plan_offline(_request("Lernen"), now_us=NOW_US)
    assert [s.tool_name for s in result.steps] == ["create_task"]
    assert "generic first step" in result.summary
    only_notes = tuple(t for t in ALL if t.name == "create_note")
    assert [s.tool_name for s in plan_offline(_request(tools=only_notes), now_us=NOW_US).steps] == [
        "create_note"
    ]


def test_nothing_offered_or_nothing_fillable() -> None:
    assert plan_offline(_request("meeting", tools=()), now_us=NOW_US).steps == ()
    needs_ids = tuple(t for t in ALL if any(r.endswith("Id") for r in t.spec.required))
    assert needs_ids  # complete_task, move_event, ...
    result = plan_offline(_request("complete the task", tools=needs_ids), now_us=NOW_US)
    assert result.steps == ()
    assert "nothing is proposed" in result.summary


def test_respects_max_length_and_steps_cap() -> None:
    tool = ToolSpec(
        "shout",
        "notes",
        "Shout a title",
        {
            "type": "object",
            "properties": {"title": {"type": "string", "maxLength": 10}},
            "required": ["title"],
        },
        "propose",
    )
    tools = offered_tools(Catalog((tool,)), None)
    result = plan_offline(_request("A very long shouting title"), now_us=NOW_US, max_steps=1)
    assert len(result.steps) == 1
    step = plan_offline(_request("A very long shouting title", tools=tools), now_us=NOW_US).steps[0]
    assert step.params["title"] == "A very lo\u2026"


_words = st.sampled_from(
    "meeting task note journal goal remember profile schedule write progress tagebuch termin "
    "the a with idea week plan run review".split()
)
_text = st.lists(_words, max_size=6).map(" ".join)


@settings(max_examples=150)
@given(
    _text,
    _text,
    _text,
    st.lists(st.sampled_from(range(len(ALL))), unique=True, max_size=len(ALL)),
    st.integers(min_value=0, max_value=4_000_000_000_000_000),
)
def test_uses_only_offered_tools_and_fills_required(
    title: str, concept: str, objective: str, picks: list[int], now_us: int
) -> None:
    tools = tuple(ALL[i] for i in sorted(picks))
    request = _request(title, concept, objective, tools)
    result = plan_offline(request, now_us=now_us)
    assert result == plan_offline(request, now_us=now_us)
    offered = {t.name: t for t in tools}
    fillable = [t for t in tools if not any(r.endswith("Id") for r in t.spec.required)]
    assert (1 if fillable else 0) <= len(result.steps) <= 3
    assert len({s.tool_name for s in result.steps}) == len(result.steps)
    for step in result.steps:
        tool = offered[step.tool_name]
        assert step.module == tool.module and step.policy == tool.policy
        assert set(tool.spec.required) <= set(step.params)
        for name, value in step.params.items():
            schema = tool.spec.properties[name]
            assert isinstance(schema, dict)
            match schema.get("type"), schema.get("format"):
                case "string", "date":
                    assert isinstance(value, str)
                    date.fromisoformat(value)
                case "string", "date-time":
                    assert isinstance(value, str)
                    datetime.fromisoformat(value)
                case "string", _:
                    assert isinstance(value, str) and value
                    max_length, enum = schema.get("maxLength"), schema.get("enum")
                    if isinstance(max_length, int):
                        assert len(value) <= max_length
                    if isinstance(enum, list):
                        assert value in enum
                case "integer", _:
                    assert isinstance(value, int)
                case "number", _:
                    assert isinstance(value, int | float)
    assert re.match(r"^Offline plan", result.summary)
