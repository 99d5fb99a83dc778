"""pytest plugin: a real local OpenAI-compatible chat-completions server (`fake_llm`).

Not a mock: the code under test talks HTTP to 127.0.0.1 on a random port. Each request to
`POST /v1/chat/completions` takes the next behaviour from a script (or `default` when the script
is empty) and is recorded (method, path, headers, raw body, decoded JSON) for assertions.

Behaviours:
- `Reply(content=..., tool_calls=[Call(name, arguments)], usage=..., finish_reason=...)`: a
  normal completion (one or several tool calls; queue several for several rounds);
- `ProviderFail(status, kind, message)`: non-2xx with `{"detail": {"kind", "message"}}`;
- `RateLimited(retry_after)`: 429 with a `Retry-After` header;
- `ServerError(status, body)`: a bare non-2xx (5xx by default);
- `Slow(delay, then)`: wait `delay` seconds, then behave as `then`;
- `Malformed(body, status)`: an arbitrary body (not JSON, no choices, ...);
- `Drop()`: close the connection without answering.

Usage: `fake_llm.script(Reply(tool_calls=[Call("create_task", {"title": "x"})]), Reply("done"))`,
then point a client at `fake_llm.url`. Register with `-p tests.fix_llm`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import aiohttp
import orjson
import pytest
from aiohttp import web

DEFAULT_USAGE: dict[str, int] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@dataclass(frozen=True)
class Call:
    """One tool call in a `Reply`. `arguments` may be a dict (sent as JSON text) or raw text."""

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class Reply:
    content: str | None = None
    tool_calls: Sequence[Call] = ()
    usage: Mapping[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    finish_reason: str | None = None
    model: str = "fake-model"


@dataclass(frozen=True)
class ProviderFail:
    status: int
    kind: str
    message: str = "the provider refused"


@dataclass(frozen=True)
class RateLimited:
    retry_after: str | float | None = 7
    body: bytes = b'{"detail": {"kind": "rate-limited", "message": "slow down"}}'


@dataclass(frozen=True)
class ServerError:
    status: int = 500
    body: bytes = b"internal server error"


@dataclass(frozen=True)
class Slow:
    delay: float
    then: Behaviour = field(default_factory=lambda: Reply("late answer"))


@dataclass(frozen=True)
class Malformed:
    body: bytes = b"this is not json"
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class Drop:
    """Close the connection without sending a response."""


Behaviour: TypeAlias = Reply | ProviderFail | RateLimited | ServerError | Slow | Malformed | Drop


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any


class FakeLLM:
    """The server. `default` answers when the script is empty."""

    def __init__(self, *, default: Behaviour | None = None) -> None:
        self.default: Behaviour = default or Reply("Nothing to plan.")
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        """Requests being answered now, and the most there ever were at once."""
        self._script: deque[Behaviour] = deque()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self.url = ""

    # --- scripting ---

    def script(self, *behaviours: Behaviour) -> FakeLLM:
        """Queue behaviours for the next requests, in order."""
        self._script.extend(behaviours)
        return self

    def reply(self, content: str | None = None, *calls: Call, **kwargs: Any) -> FakeLLM:
        return self.script(Reply(content, tuple(calls), **kwargs))

    @property
    def pending(self) -> int:
        return len(self._script)

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    # --- lifecycle ---

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the protocol ---

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            decoded: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            decoded = None
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                json=decoded,
            )
        )
        behaviour = self._script.popleft() if self._script else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._behave(request, behaviour)
        finally:
            self.in_flight -= 1

    async def _behave(self, request: web.Request, behaviour: Behaviour) -> web.StreamResponse:
        match behaviour:
            case Reply():
                return web.Response(
                    body=orjson.dumps(self._completion(behaviour)),
                    content_type="application/json",
                )
            case ProviderFail(status=status, kind=kind, message=message):
                payload = {"detail": {"kind": kind, "message": message}}
                return web.Response(
                    status=status, body=orjson.dumps(payload), content_type="application/json"
                )
            case RateLimited(retry_after=retry_after, body=body):
                headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
                return web.Response(
                    status=429, body=body, headers=headers, content_type="application/json"
                )
            case ServerError(status=status, body=body):
                return web.Response(status=status, body=body, content_type="text/plain")
            case Slow(delay=delay, then=then):
                try:
                    await asyncio.wait_for(self._closing.wait(), timeout=delay)
                except TimeoutError:
                    pass
                return await self._behave(request, then)
            case Malformed(body=body, status=status, content_type=content_type):
                return web.Response(status=status, body=body, content_type=content_type)
            case Drop():
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
        raise AssertionError(f"unknown behaviour {behaviour!r}")

    def _completion(self, reply: Reply) -> dict[str, Any]:
        n = next(self._ids)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id or f"call_{n}_{i}",
                    "type": "function",
                    "function": {
                        "name": call.name,
                        "arguments": call.arguments
                        if isinstance(call.arguments, str)
                        else orjson.dumps(dict(call.arguments)).decode(),
                    },
                }
                for i, call in enumerate(reply.tool_calls)
            ]
        finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
        out: dict[str, Any] = {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "model": reply.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        if reply.usage is not None:
            out["usage"] = dict(reply.usage)
        return out


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """A started fake server; closed (slow handlers released) after the test."""
    server = FakeLLM()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def llm_http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to `fake_llm` (closed after the test)."""
    async with aiohttp.ClientSession() as session:
        yield session
