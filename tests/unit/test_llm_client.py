"""The chat-completions client against a real local fake server (tests/fix_llm.py)."""

from __future__ import annotations

import socket
import time

import aiohttp
import orjson
import pytest

from core.clock import ManualClock
from core.errors import ConfigurationError
from planner.catalog import load_catalog
from planner.errors import PlannerError
from planner.llm import (
    AssistantMessage,
    ChatClient,
    Message,
    ProviderError,
    SystemMessage,
    ToolCall,
    ToolMessage,
    Usage,
    UserMessage,
    error_from_response,
    parse_completion,
    provider_label,
)
from tests.fix_llm import (
    Call,
    Drop,
    FakeLLM,
    Malformed,
    ProviderFail,
    RateLimited,
    Reply,
    ServerError,
    Slow,
)

KEY = "sk-test-0123456789abcdef"
MESSAGES: list[Message] = [SystemMessage("frame"), UserMessage("plan it")]
TOOLS = [t for t in load_catalog() if t.name in ("create_task", "create_note")]


def _client(
    session: aiohttp.ClientSession, url: str, *, timeout: float = 5.0, **kw: object
) -> ChatClient:
    return ChatClient(session=session, base_url=url, api_key=KEY, timeout=timeout, **kw)  # type: ignore[arg-type]


async def _error(client: ChatClient) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await client.complete(MESSAGES, TOOLS)
    assert isinstance(info.value, PlannerError)
    assert KEY not in str(info.value) and KEY not in info.value.message
    return info.value


async def test_request_shape_and_bearer(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(Reply("ok"))
    client = _client(llm_http_session, fake_llm.url + "/", model="mana/test")
    await client.complete(MESSAGES, TOOLS)
    request = fake_llm.last
    assert request.method == "POST" and request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    body = request.json
    assert list(body) == [
        "model",
        "messages",
        "tools",
        "tool_choice",
        "temperature",
        "stream",
    ]
    assert body["model"] == "mana/test"
    assert body["messages"] == [
        {"role": "system", "content": "frame"},
        {"role": "user", "content": "plan it"},
    ]
    assert body["tool_choice"] == "auto" and body["temperature"] == 0.3
    assert body["stream"] is False
    assert [t["function"]["name"] for t in body["tools"]] == ["create_task", "create_note"]
    assert body["tools"][0]["type"] == "function"
    assert body["tools"][0]["function"]["parameters"] == TOOLS[0].parameters


async def test_no_tools_omits_tools_and_tool_choice(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    completion = await _client(llm_http_session, fake_llm.url).complete(MESSAGES)
    assert completion.message.content == "Nothing to plan."  # the fake's default answer
    body = fake_llm.last.json
    assert "tools" not in body and "tool_choice" not in body
    assert body["model"] == "mana/reasoning"


async def test_assistant_and_tool_messages_on_the_wire(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    call = ToolCall("c1", "create_task", '{"title":"x"}', {"title": "x"})
    history: list[Message] = [
        *MESSAGES,
        AssistantMessage(None, (call,)),
        ToolMessage("c1", '{"success": true}'),
        AssistantMessage("thinking"),
    ]
    await _client(llm_http_session, fake_llm.url).complete(history, TOOLS)
    sent = fake_llm.last.json["messages"]
    assert sent[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "create_task", "arguments": '{"title":"x"}'},
            }
        ],
    }
    assert sent[3] == {"role": "tool", "tool_call_id": "c1", "content": '{"success": true}'}
    assert sent[4] == {"role": "assistant", "content": "thinking"}


async def test_parses_tool_calls_content_usage(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(
        Reply(
            "here",
            [Call("create_task", {"title": "a"}, id="x1"), Call("create_note", "{not json")],
            usage={"prompt_tokens": 100, "completion_tokens": 20},
        )
    )
    completion = await _client(llm_http_session, fake_llm.url).complete(MESSAGES, TOOLS)
    assert completion.message.content == "here"
    assert completion.finish_reason == "tool_calls"
    assert completion.model == "fake-model"
    assert completion.usage == Usage(100, 20, 120)  # total falls back to the sum
    first, second = completion.message.tool_calls
    assert (first.id, first.name, first.arguments) == ("x1", "create_task", {"title": "a"})
    assert second.arguments is None and second.arguments_error == "arguments are not valid JSON"
    assert second.raw_arguments == "{not json"


async def test_missing_usage_is_zero(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(Reply("ok", usage=None))
    completion = await _client(llm_http_session, fake_llm.url).complete(MESSAGES)
    assert completion.usage == Usage(0, 0, 0)


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (400, "context-length-exceeded", False),
        (403, "model-not-allowed", False),
        (502, "upstream", True),
    ],
)
async def test_provider_error_kind(
    fake_llm: FakeLLM,
    llm_http_session: aiohttp.ClientSession,
    status: int,
    kind: str,
    retryable: bool,
) -> None:
    fake_llm.script(ProviderFail(status, kind, "details here"))
    error = await _error(_client(llm_http_session, fake_llm.url))
    assert (error.kind, error.status, error.retryable) == (kind, status, retryable)
    assert "details here" in error.message
    assert error.provider == "127.0.0.1"


async def test_unsafe_provider_kind_is_not_a_label(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(ProviderFail(400, "Not A Label!" * 10))
    error = await _error(_client(llm_http_session, fake_llm.url))
    assert error.kind == "http-400"


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (500, True), (503, True)])
async def test_other_non_2xx(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession, status: int, retryable: bool
) -> None:
    fake_llm.script(ServerError(status, b"<html>oops</html>"))
    error = await _error(_client(llm_http_session, fake_llm.url))
    assert (error.kind, error.retryable, error.status) == (f"http-{status}", retryable, status)
    assert "oops" in error.message


async def test_rate_limited_with_retry_after(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(RateLimited(retry_after=7), RateLimited(retry_after=None, body=b""))
    client = _client(llm_http_session, fake_llm.url)
    error = await _error(client)
    assert (error.kind, error.status, error.retryable, error.retry_after) == (
        "rate-limited",
        429,
        True,
        7.0,
    )
    error = await _error(client)
    assert error.kind == "rate-limited" and error.retry_after is None


async def test_retry_after_http_date_uses_the_clock(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    clock = ManualClock(now_us=1_776_254_400_000_000)  # 2026-04-15T12:00:00Z
    fake_llm.script(RateLimited(retry_after="Wed, 15 Apr 2026 12:00:30 GMT"))
    error = await _error(_client(llm_http_session, fake_llm.url, clock=clock))
    assert error.retry_after == 30.0


async def test_unreachable(llm_http_session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = await _error(_client(llm_http_session, f"http://127.0.0.1:{port}"))
    assert (error.kind, error.retryable, error.status) == ("unreachable", True, None)


async def test_dropped_connection_is_unreachable(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(Drop())
    error = await _error(_client(llm_http_session, fake_llm.url))
    assert (error.kind, error.retryable) == ("unreachable", True)


async def test_timeout(fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession) -> None:
    fake_llm.script(Slow(10))
    started = time.monotonic()
    error = await _error(_client(llm_http_session, fake_llm.url, timeout=0.3))
    assert time.monotonic() - started < 3
    assert (error.kind, error.retryable) == ("timeout", True)
    assert "0.3 s" in error.message


async def test_slow_but_within_timeout(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(Slow(0.1, Reply("late but fine")))
    completion = await _client(llm_http_session, fake_llm.url, timeout=5).complete(MESSAGES)
    assert completion.message.content == "late but fine"


@pytest.mark.parametrize(
    "body",
    [
        b"this is not json",
        b"[]",
        b"{}",
        b'{"choices": []}',
        b'{"choices": [{"finish_reason": "stop"}]}',
        b'{"choices": [{"message": {"content": 3}}]}',
        b'{"choices": [{"message": {"content": "x", "tool_calls": {}}}]}',
        b'{"choices": [{"message": {"tool_calls": [{"id": "a"}]}}]}',
        b'{"choices": [{"message": {"tool_calls": [{"function": {"name": ""}}]}}]}',
    ],
)
async def test_malformed_bodies(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession, body: bytes
) -> None:
    fake_llm.script(Malformed(body))
    error = await _error(_client(llm_http_session, fake_llm.url))
    assert (error.kind, error.retryable) == ("malformed-response", False)
    assert error.provider == "127.0.0.1"


async def test_api_key_never_in_errors(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    echo = orjson.dumps({"detail": {"kind": "auth", "message": f"bad key {KEY}"}})
    fake_llm.script(Malformed(echo, status=401))
    client = _client(llm_http_session, fake_llm.url)
    error = await _error(client)
    assert error.kind == "auth" and "***" in error.message
    assert KEY not in repr(client)


def test_bad_base_url(llm_http_session: object = None) -> None:
    session = object()
    for url in ("ftp://x", "not a url", "http://"):
        with pytest.raises(ConfigurationError) as info:
            ChatClient(session=session, base_url=url, api_key=KEY)  # type: ignore[arg-type]
        assert info.value.setting == "PLANNER_URL"
        assert KEY not in str(info.value)


def test_provider_label() -> None:
    assert provider_label("https://user:pw@llm.mana.how:8443/base") == "llm.mana.how"
    client = ChatClient(session=object(), base_url="http://gw.local", api_key=KEY)  # type: ignore[arg-type]
    assert client.provider == "gw.local"
    assert client.url == "http://gw.local/v1/chat/completions"
    named = ChatClient(session=object(), base_url="http://gw.local/", api_key=KEY, provider="mana")  # type: ignore[arg-type]
    assert named.provider == "mana"


# --- the pure core on canned bytes -----------------------------------------------------------


def test_parse_completion_variants() -> None:
    body = orjson.dumps(
        {
            "choices": [
                {
                    "message": {
                        "content": None,
                        "tool_calls": [
                            {"function": {"name": "a", "arguments": {"x": 1}}},
                            {"id": "", "function": {"name": "b", "arguments": "[1]"}},
                            {"id": "z", "function": {"name": "c"}},
                            {"id": "w", "function": {"name": "d", "arguments": 5}},
                        ],
                    },
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 9},
        }
    )
    completion = parse_completion(body)
    a, b, c, d = completion.message.tool_calls
    assert (a.id, a.arguments, a.raw_arguments) == ("call_0", {"x": 1}, '{"x":1}')
    assert (b.id, b.arguments, b.arguments_error) == (
        "call_1",
        None,
        "arguments are not a JSON object",
    )
    assert c.arguments is None and c.arguments_error == "arguments are empty"
    assert d.arguments is None
    assert completion.usage == Usage(3, 4, 9)
    assert completion.finish_reason is None


def test_error_from_response_shapes() -> None:
    openai = orjson.dumps({"error": {"message": "model overloaded", "type": "x"}})
    error = error_from_response(503, {"retry-after": "2.5"}, openai, provider="p")
    assert (error.kind, error.retry_after, error.retryable) == ("http-503", 2.5, True)
    assert "model overloaded" in error.message
    fastapi = orjson.dumps({"detail": "Not Found"})
    assert "Not Found" in error_from_response(404, {}, fastapi).message
    assert error_from_response(429, {"retry-after": "soon"}, b"").retry_after is None
    assert error_from_response(429, {"retry-after": "-3"}, b"").retry_after == 0.0
    assert "no error details" in error_from_response(500, {}, b"  ").message


async def test_oversized_body_is_malformed(
    fake_llm: FakeLLM, llm_http_session: aiohttp.ClientSession
) -> None:
    fake_llm.script(Malformed(b"x" * 9_000_000))
    error = await _error(_client(llm_http_session, fake_llm.url))
    assert error.kind == "malformed-response"


async def test_session_raise_for_status_does_not_change_the_mapping(fake_llm: FakeLLM) -> None:
    fake_llm.script(RateLimited(retry_after=1))
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        error = await _error(_client(session, fake_llm.url))
    assert (error.kind, error.retry_after) == ("rate-limited", 1.0)
