"""The OpenAI-compatible chat-completions protocol, without I/O (domain.md §5).

The message types (frozen dataclasses), `encode_request` (messages + tools -> request body
bytes), `parse_completion` (response body bytes -> `ChatCompletion`) and `error_from_response`
(status, headers, body -> `ProviderError`); no I/O, no clock reads. `planner.llm.ChatClient` is
the aiohttp shell around it.

Error kinds (`PlannerError.kind`, a metrics label): the provider's own `detail.kind` when a
non-2xx body carries `{detail: {kind, message}}` and the kind is a sane label; else `rate-limited`
(429) or `http-<status>`; `unreachable` (connection refused/reset/dropped), `timeout`,
`malformed-response` (a 2xx whose body is not a chat completion). `retryable` depends only on
what happened, not on the provider's words: True for unreachable, timeout, 429 and 5xx.

The API key goes into the `authorization` header and nowhere else: it is never logged, never part
of an exception message, and redacted from any provider text we quote.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeAlias

import orjson
from yarl import URL

from core.errors import ConfigurationError
from core.json_types import JsonValue
from planner.catalog import ToolSpec
from planner.errors import PlannerError

DEFAULT_MODEL = "mana/reasoning"
DEFAULT_TIMEOUT = 120.0
TEMPERATURE = 0.3
MAX_BODY = 8_000_000  # bytes; a chat completion is far smaller, a runaway body is an error
_KIND = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # a provider kind we accept as a label
_QUOTE_LIMIT = 300  # characters of provider text quoted in an error message


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model asked for.

    `arguments` is the decoded JSON object, or None when `raw_arguments` is not a JSON object;
    then `arguments_error` says why. The loop, not the parser, decides what that means.
    """

    id: str
    name: str
    raw_arguments: str
    arguments: dict[str, JsonValue] | None
    arguments_error: str | None = None


@dataclass(frozen=True, slots=True)
class SystemMessage:
    content: str


@dataclass(frozen=True, slots=True)
class UserMessage:
    content: str


@dataclass(frozen=True, slots=True)
class AssistantMessage:
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolMessage:
    tool_call_id: str
    content: str


Message: TypeAlias = SystemMessage | UserMessage | AssistantMessage | ToolMessage


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
        )


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    message: AssistantMessage
    finish_reason: str | None
    usage: Usage
    model: str | None = None


# --- errors ---------------------------------------------------------------------------------


class ProviderError(PlannerError):
    """A failed chat-completions call. `status` is the HTTP status when there was a response;
    `retry_after` the seconds the provider asked us to wait (429/503 with `Retry-After`)."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
        provider: str = "",
    ) -> None:
        super().__init__(kind, message, retryable=retryable)
        self.status = status
        self.retry_after = retry_after
        self.provider = provider


def _malformed(message: str) -> ProviderError:
    return ProviderError("malformed-response", message, retryable=False, status=200)


# --- the pure protocol core -----------------------------------------------------------------


def message_json(message: Message) -> dict[str, JsonValue]:
    """One message in the wire shape."""
    match message:
        case SystemMessage(content=content):
            return {"role": "system", "content": content}
        case UserMessage(content=content):
            return {"role": "user", "content": content}
        case AssistantMessage(content=content, tool_calls=()):
            return {"role": "assistant", "content": content or ""}
        case AssistantMessage(content=content, tool_calls=calls):
            return {
                "role": "assistant",
                "content": content,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.raw_arguments},
                    }
                    for c in calls
                ],
            }
        case ToolMessage(tool_call_id=call_id, content=content):
            return {"role": "tool", "tool_call_id": call_id, "content": content}


def encode_request(*, model: str, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> bytes:
    """The request body. `tools`/`tool_choice` are omitted when nothing is offered."""
    body: dict[str, JsonValue] = {
        "model": model,
        "messages": [message_json(m) for m in messages],
    }
    if tools:
        body["tools"] = [t.function_schema() for t in tools]
        body["tool_choice"] = "auto"
    body["temperature"] = TEMPERATURE
    body["stream"] = False
    return orjson.dumps(body)


def parse_completion(body: bytes) -> ChatCompletion:
    """Parse a 2xx body. Raises `ProviderError("malformed-response")` when it is not a chat
    completion with at least one choice carrying an assistant message."""
    try:
        data: JsonValue = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _malformed(f"the body is not JSON: {_quote(body)}") from None
    if not isinstance(data, dict):
        raise _malformed("the body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _malformed("no choices in the response")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _malformed("choices[0] has no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _malformed("choices[0].message.content is not a string")
    raw_calls = message.get("tool_calls")
    if raw_calls is None:
        raw_calls = []
    if not isinstance(raw_calls, list):
        raise _malformed("choices[0].message.tool_calls is not a list")
    calls = tuple(_parse_tool_call(raw, index) for index, raw in enumerate(raw_calls))
    finish = choice.get("finish_reason")
    model = data.get("model")
    return ChatCompletion(
        message=AssistantMessage(content=content, tool_calls=calls),
        finish_reason=finish if isinstance(finish, str) else None,
        usage=_parse_usage(data.get("usage")),
        model=model if isinstance(model, str) else None,
    )


def _parse_tool_call(raw: JsonValue, index: int) -> ToolCall:
    if not isinstance(raw, dict):
        raise _malformed(f"tool_calls[{index}] is not an object")
    function = raw.get("function")
    if not isinstance(function, dict):
        raise _malformed(f"tool_calls[{index}] has no function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _malformed(f"tool_calls[{index}] has no function name")
    call_id = raw.get("id")
    # Some servers omit ids; the loop only needs them unique within one assistant turn.
    if not isinstance(call_id, str) or not call_id:
        call_id = f"call_{index}"
    raw_args = function.get("arguments")
    match raw_args:
        case dict():  # a few servers send the object itself instead of its JSON text
            return ToolCall(call_id, name, orjson.dumps(raw_args).decode(), raw_args)
        case str():
            text = raw_args
        case None:
            text = ""
        case _:
            return ToolCall(
                call_id, name, orjson.dumps(raw_args).decode(), None, "arguments are not an object"
            )
    if not text.strip():
        return ToolCall(call_id, name, text, None, "arguments are empty")
    try:
        decoded: JsonValue = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ToolCall(call_id, name, text, None, "arguments are not valid JSON")
    if not isinstance(decoded, dict):
        return ToolCall(call_id, name, text, None, "arguments are not a JSON object")
    return ToolCall(call_id, name, text, decoded)


def _parse_usage(raw: JsonValue) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    prompt = _count(raw.get("prompt_tokens"))
    completion = _count(raw.get("completion_tokens"))
    total = _count(raw.get("total_tokens"))
    if total == 0:
        total = prompt + completion
    return Usage(prompt, completion, total)


def _count(value: JsonValue) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return int(value)


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    provider: str = "",
    now_us: int | None = None,
    secret: str = "",
) -> ProviderError:
    """The error for a non-2xx response. `now_us` resolves an HTTP-date `Retry-After`;
    `secret` (the API key) is redacted from any provider text quoted in the message."""
    kind = "rate-limited" if status == 429 else f"http-{status}"
    message = ""
    try:
        data: JsonValue = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(detail := data.get("detail"), dict):
        provider_kind = detail.get("kind")
        if isinstance(provider_kind, str) and _KIND.match(provider_kind):
            kind = provider_kind
        if isinstance(text := detail.get("message"), str):
            message = text
    elif isinstance(data, dict) and isinstance(detail := data.get("detail"), str):
        message = detail
    elif isinstance(data, dict) and isinstance(err := data.get("error"), dict):
        if isinstance(text := err.get("message"), str):  # OpenAI's own error shape
            message = text
    if not message:
        message = _quote(body) if body.strip() else "no error details"
    message = redact(message, secret)[:_QUOTE_LIMIT]
    retry_after = _retry_after(headers.get("retry-after"), now_us)
    return ProviderError(
        kind,
        f"HTTP {status} from {provider or 'the planner'}: {message}",
        retryable=status == 429 or status >= 500,
        status=status,
        retry_after=retry_after,
        provider=provider,
    )


def _retry_after(value: str | None, now_us: int | None) -> float | None:
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        if now_us is None:
            return None
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now_us / 1_000_000
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _quote(body: bytes) -> str:
    text = body[:_QUOTE_LIMIT].decode("utf-8", errors="replace").strip()
    return repr(text) if text else "(empty body)"


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def provider_label(base_url: str) -> str:
    """A metrics label for a planner URL: its host (no credentials, path or port)."""
    try:
        host = URL(base_url.strip()).host
    except ValueError:
        host = None
    return host or "unknown"


def base_url_of(base_url: str) -> URL:
    """The validated base URL. The message never repeats the value: it may hold credentials."""
    try:
        url = URL(base_url.strip().rstrip("/"))
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            "PLANNER_URL",
            "not an http(s) URL with a host; use e.g. https://llm.example.com "
            "(the client appends /v1/chat/completions)",
        )
    return url


# --- the I/O shell --------------------------------------------------------------------------
