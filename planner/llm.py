"""The OpenAI-compatible chat-completions client: the thin aiohttp shell (domain.md §5).

One POST, explicit timeouts, and translation of every foreign exception into a
`ProviderError` at the boundary; the protocol itself (messages, encoding, parsing, error
mapping) is the pure `planner.chat`, re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
from opentelemetry import trace

from core.clock import Clock, SystemClock
from core.errors import ConfigurationError
from planner.catalog import ToolSpec
from planner.chat import (
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    MAX_BODY,
    AssistantMessage,
    ChatCompletion,
    Message,
    ProviderError,
    SystemMessage,
    ToolCall,
    ToolMessage,
    Usage,
    UserMessage,
    base_url_of,
    encode_request,
    error_from_response,
    message_json,
    parse_completion,
    provider_label,
    redact,
)

__all__ = [
    "DEFAULT_MODEL",
    "AssistantMessage",
    "ChatClient",
    "ChatCompletion",
    "Message",
    "ProviderError",
    "SystemMessage",
    "ToolCall",
    "ToolMessage",
    "Usage",
    "UserMessage",
    "encode_request",
    "error_from_response",
    "message_json",
    "parse_completion",
    "provider_label",
]

tracer = trace.get_tracer("planner.llm")


class ChatClient:
    """POSTs chat completions to one OpenAI-compatible server.

    The session is borrowed, never closed here. One call is one HTTP request: retrying (with
    `ProviderError.retry_after`) is the caller's decision.
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        model: str = DEFAULT_MODEL,
        timeout: float = DEFAULT_TIMEOUT,
        provider: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        url = base_url_of(base_url)
        if timeout <= 0:
            raise ConfigurationError("PLANNER_TIMEOUT", "the planner timeout must be positive")
        self._session = session
        self._url = url / "v1" / "chat" / "completions"
        self._api_key = api_key
        self.model = model
        self.timeout = timeout
        self.provider = provider or provider_label(base_url)
        self._clock: Clock = clock or SystemClock()
        # `total` bounds the whole exchange including the body; `connect` fails fast on a dead
        # host so a down planner is reported as unreachable well before the total deadline.
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(10.0, timeout), sock_read=timeout
        )

    @property
    def url(self) -> str:
        return str(self._url.with_user(None))

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r}, provider={self.provider!r})"

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()
    ) -> ChatCompletion:
        """One chat-completions call. Raises `ProviderError` and nothing else on failure."""
        with tracer.start_as_current_span(
            "POST /v1/chat/completions",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "server.address": self.provider,
                "gen_ai.request.model": self.model,
                "gen_ai.system": "openai",
            },
        ) as span:
            try:
                completion = await self._complete(messages, tools, span)
            except ProviderError as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.kind))
                span.set_attribute("error.type", exc.kind)
                raise
            span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
                }
            )
            return completion

    async def _complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], span: trace.Span
    ) -> ChatCompletion:
        body = encode_request(model=self.model, messages=messages, tools=tools)
        headers = {
            "authorization": f"Bearer {self._api_key}",
            "content-type": "application/json",
            "accept": "application/json",
        }
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                raise_for_status=False,  # statuses are ours to map, whatever the session says
            ) as response:
                payload = await _read_bounded(response)
                status = response.status
                span.set_attribute("http.response.status_code", status)
                response_headers = {k.lower(): v for k, v in response.headers.items()}
        except _TooLarge:
            raise self._error(
                "malformed-response", f"the response exceeds {MAX_BODY // 1_000_000} MB", False
            ) from None
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError on 3.11
            raise self._error("timeout", f"no answer within {self.timeout:g} s", True) from None
        except aiohttp.ClientConnectionError as exc:
            raise self._error("unreachable", _describe(exc), True) from None
        except aiohttp.ClientPayloadError as exc:
            msg = f"the response broke off: {_describe(exc)}"
            raise self._error("unreachable", msg, True) from None
        except aiohttp.ClientError as exc:
            raise self._error("unreachable", _describe(exc), True) from None
        if not 200 <= status < 300:
            raise error_from_response(
                status,
                response_headers,
                payload,
                provider=self.provider,
                now_us=self._clock.now_us(),
                secret=self._api_key,
            )
        try:
            return parse_completion(payload)
        except ProviderError as exc:
            exc.provider = self.provider
            raise

    def _error(self, kind: str, detail: str, retryable: bool) -> ProviderError:
        text = redact(f"{self.url}: {detail}", self._api_key)
        return ProviderError(kind, text, retryable=retryable, provider=self.provider)


class _TooLarge(Exception):
    pass


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65_536):
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
