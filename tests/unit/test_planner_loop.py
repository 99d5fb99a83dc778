"""The function-calling loop (domain.md §5) against the fake server, and its sans-IO core."""

from __future__ import annotations

import json

import aiohttp
import pytest

from core.json_types import JsonValue
from planner.catalog import load_catalog
from planner.llm import (
    AssistantMessage,
    ChatClient,
    ChatCompletion,
    ProviderError,
    ToolCall,
    Usage,
)
from planner.loop import (
    ACCEPTED,
    MAX_ROUNDS,
    CallRecord,
    LlmPlanner,
    PlanConversation,
    Planner,
    PlanRequest,
)
from planner.policy import offered_tools
from planner.prompt import build_prompt
from tests.fix_llm import Call, FakeLLM, ProviderFail, RateLimited, Reply, Slow

CATALOG = load_catalog()
MISSION: JsonValue = {"id": "m1", "title": "Plan the week", "objective": "Get organised"}


def _request(policy: object = None) -> PlanRequest:
    prompt = build_prompt(mission=MISSION, agent=None)
    tools = offered_tools(CATALOG, policy)  # type: ignore[arg-type]
    return PlanRequest(prompt.messages, tools, prompt.brief)


def _planner(session: aiohttp.ClientSession, url: str, *, timeout: float = 5.0) -> LlmPlanner:
    client = ChatClient(session=session, base_url=url, api_key="k", timeout=timeout)
    return LlmPlanner(client=client)


async def test_tool_calls_over_several_rounds_become_steps(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(
        Reply(
            None,
            [
                Call("create_task", {"title": "Buy milk"}, id="a"),
                Call("create_event", {"title": "Sync", "startsAt": "2026-04-16T09:00:00Z"}, id="b"),
            ],
        ),
        Reply("one more", [Call("create_note", {"title": "Week", "content": "..."}, id="c")]),
        Reply("Three steps: a task, an event and a note."),
    )
    planner: Planner = _planner(llm_http_session, fake_llm.url)
    result = await planner.plan(_request({"defaultsByModule": {"calendar": "auto"}}))
    assert [(s.tool_name, s.module, s.params, s.policy) for s in result.steps] == [
        ("create_task", "todo", {"title": "Buy milk"}, "propose"),
        ("create_event", "calendar", {"title": "Sync", "startsAt": "2026-04-16T09:00:00Z"}, "auto"),
        ("create_note", "notes", {"title": "Week", "content": "..."}, "propose"),
    ]
    assert result.steps[0].summary.endswith("(title: Buy milk)")
    assert result.summary == "Three steps: a task, an event and a note."
    assert result.rounds == 3 and not result.capped
    assert result.usage == Usage(30, 15, 45)
    assert (result.parse_failures, result.rejected_calls) == (0, 0)
    assert result.provider == "127.0.0.1" and result.model == "mana/reasoning"
    assert [c.outcome for c in result.calls] == ["planned"] * 3

    assert len(fake_llm.requests) == 3
    second = fake_llm.requests[1].json["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool", "tool"]
    assert [c["id"] for c in second[2]["tool_calls"]] == ["a", "b"]
    assert [(m["tool_call_id"], m["content"]) for m in second[3:]] == [
        ("a", ACCEPTED),
        ("b", ACCEPTED),
    ]
    assert json.loads(ACCEPTED) == {
        "success": True,
        "message": "recorded - pending client application",
    }
    third = fake_llm.requests[2].json["messages"]
    assert [m["role"] for m in third] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
    ]
    assert third[5]["content"] == "one more"
    offered = [t.name for t in _request({"defaultsByModule": {"calendar": "auto"}}).tools]
    for request in fake_llm.requests:
        assert [t["function"]["name"] for t in request.json["tools"]] == offered


async def test_round_cap(fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession) -> None:
    fake_llm.default = Reply("still going", [Call("create_task", {"title": "again"})])
    result = await _planner(llm_http_session, fake_llm.url).plan(_request())
    assert len(fake_llm.requests) == MAX_ROUNDS == 5
    assert result.rounds == 5 and result.capped
    assert len(result.steps) == 5
    assert "stopped after 5 rounds" in result.summary
    assert result.summary.startswith("still going")
    assert result.usage.total_tokens == 75


async def test_rejected_and_unparseable_calls_are_not_steps(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(
        Reply(
            None,
            [
                Call("delete_task", {"taskId": "t1"}, id="deny"),  # deny in the catalog
                Call("create_task", {"title": "ok"}, id="ok"),
                Call("create_note", "{broken", id="bad"),
                Call("create_note", "[1, 2]", id="list"),
                Call("launch_rocket", {}, id="nope"),
            ],
        ),
        Reply("done"),
    )
    result = await _planner(llm_http_session, fake_llm.url).plan(_request())
    assert [s.tool_name for s in result.steps] == ["create_task"]
    assert (result.rejected_calls, result.parse_failures) == (2, 2)
    assert result.calls == (
        CallRecord("delete_task", "none", "rejected"),
        CallRecord("create_task", "propose", "planned"),
        CallRecord("create_note", "propose", "parse-failure"),
        CallRecord("create_note", "propose", "parse-failure"),
        CallRecord("launch_rocket", "none", "rejected"),
    )
    answers = {
        m["tool_call_id"]: json.loads(m["content"])
        for m in fake_llm.requests[1].json["messages"]
        if m["role"] == "tool"
    }
    assert answers["ok"]["success"] is True
    for call_id in ("deny", "bad", "list", "nope"):
        assert answers[call_id]["success"] is False and answers[call_id]["message"]
    assert "not available" in answers["nope"]["message"]
    assert "not valid JSON" in answers["bad"]["message"]


async def test_denied_tool_is_not_offered_and_its_call_rejected(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(Reply(None, [Call("create_task", {"title": "x"})]), Reply("ok"))
    request = _request({"tools": {"create_task": "deny"}})
    result = await _planner(llm_http_session, fake_llm.url).plan(request)
    names = [t["function"]["name"] for t in fake_llm.requests[0].json["tools"]]
    assert "create_task" not in names
    assert result.steps == () and result.rejected_calls == 1


async def test_no_tools_offered(fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession) -> None:
    fake_llm.script(Reply("Nothing I can do without tools."))
    result = await _planner(llm_http_session, fake_llm.url).plan(_request({"defaultForAi": "deny"}))
    assert "tools" not in fake_llm.last.json
    assert result.steps == () and result.rounds == 1
    assert result.summary == "Nothing I can do without tools."


async def test_empty_answer_and_think_blocks(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    planner = _planner(llm_http_session, fake_llm.url)
    fake_llm.script(Reply(None, [Call("create_task", {"title": "x"})]), Reply(""))
    assert (await planner.plan(_request())).summary == "The planner proposed 1 step."
    fake_llm.script(Reply("<think>long reasoning</think>\nShort plan."))
    assert (await planner.plan(_request())).summary == "Short plan."


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [
        (ProviderFail(400, "context-length-exceeded"), "context-length-exceeded"),
        (RateLimited(retry_after=3), "rate-limited"),
        (Slow(5), "timeout"),
    ],
)
async def test_errors_in_a_later_round_propagate(
    fake_llm: FakeLLM,
    llm_http_session: aiohttp.ClientSession,
    behaviour: ProviderFail | RateLimited | Slow,
    kind: str,
) -> None:
    fake_llm.script(Reply(None, [Call("create_task", {"title": "x"})]), behaviour)
    with pytest.raises(ProviderError) as info:
        await _planner(llm_http_session, fake_llm.url, timeout=0.3).plan(_request())
    assert info.value.kind == kind
    if kind == "rate-limited":
        assert info.value.retry_after == 3.0
    assert len(fake_llm.requests) == 2


# --- the sans-IO core ------------------------------------------------------------------------


def _completion(content: str | None, *calls: ToolCall, tokens: int = 1) -> ChatCompletion:
    return ChatCompletion(AssistantMessage(content, calls), None, Usage(tokens, 0, tokens))


def test_conversation_core_without_a_server() -> None:
    conversation = PlanConversation(_request(), provider="canned", max_rounds=2)
    call = ToolCall("1", "create_goal", '{"title": "Run"}', {"title": "Run"})
    assert conversation.feed(_completion("", call)) is False
    assert conversation.feed(_completion("", call)) is True
    result = conversation.result()
    assert result.capped and result.rounds == 2 and len(result.steps) == 2
    assert result.summary.startswith("Planning stopped after 2 rounds")
    assert result.provider == "canned"
    with pytest.raises(RuntimeError):
        conversation.feed(_completion("late"))


def test_conversation_result_before_done_is_an_error() -> None:
    conversation = PlanConversation(_request(), provider="canned")
    with pytest.raises(RuntimeError):
        conversation.result()
    with pytest.raises(ValueError):
        PlanConversation(_request(), provider="canned", max_rounds=0)
