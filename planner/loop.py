"""The function-calling loop of domain.md §5, and the `Planner` protocol.

A plan is at most `MAX_ROUNDS` chat-completions rounds. Each round: call; append the assistant
turn; no tool calls -> stop, the content is the plan summary; else every tool call becomes a
plan step and is answered with a `tool` message, then the next round. The server never executes a
tool: the answer to an accepted call is always `{"success": true, "message": "recorded - pending
client application"}`.

A call is *not* a step, and is answered with `{"success": false, "message": ...}` so the model
can correct itself, when it names a tool that was not offered (`rejected`) or its arguments are
not a JSON object (`parse-failure`). Arguments are not checked against the schema beyond that:
the client validates a step before applying it.

`PlanConversation` is the sans-IO core (messages in, completions fed back, a `PlanResult` out);
`LlmPlanner` is its I/O shell over a `ChatClient`. Provider errors propagate unchanged
(`ProviderError`); retrying is the caller's decision.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

from planner.chat import (
    ChatCompletion,
    Message,
    ToolCall,
    ToolMessage,
    Usage,
)
from planner.policy import OfferedTool
from planner.prompt import MissionBrief
from writer.iterations import PlanStep

if TYPE_CHECKING:
    from planner.llm import ChatClient  # the aiohttp shell; not imported to plan offline

MAX_ROUNDS = 5
ACCEPTED = json.dumps({"success": True, "message": "recorded - pending client application"})
_SUMMARY_LIMIT = 4000
_NO_BRIEF = MissionBrief("", "", "")
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)

CallOutcome: TypeAlias = Literal["planned", "rejected", "parse-failure"]


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What became of one tool call (labels of `mana_ai_tool_calls_total{tool,policy,outcome}`).
    `policy` is `none` for a tool that was not offered."""

    tool: str
    policy: str
    outcome: CallOutcome


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """Everything one plan needs. `brief` is the plaintext mission text (for offline
    planning)."""

    messages: tuple[Message, ...]
    tools: tuple[OfferedTool, ...]
    brief: MissionBrief = _NO_BRIEF


@dataclass(frozen=True, slots=True)
class PlanResult:
    summary: str
    steps: tuple[PlanStep, ...]
    rounds: int
    usage: Usage
    parse_failures: int
    rejected_calls: int
    provider: str
    model: str = ""
    capped: bool = False
    """True when the round cap stopped a model that was still calling tools."""
    calls: tuple[CallRecord, ...] = ()


class Planner(Protocol):
    async def plan(self, request: PlanRequest) -> PlanResult: ...


class PlanConversation:
    """The loop's state: feed it one completion per round until `done`."""

    def __init__(
        self, request: PlanRequest, *, provider: str, model: str = "", max_rounds: int = MAX_ROUNDS
    ) -> None:
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.messages: list[Message] = list(request.messages)
        self.tools = {t.name: t for t in request.tools}
        self.specs = tuple(t.spec for t in request.tools)
        self.done = False
        self._provider = provider
        self._model = model
        self._max_rounds = max_rounds
        self._rounds = 0
        self._usage = Usage()
        self._steps: list[PlanStep] = []
        self._calls: list[CallRecord] = []
        self._summary = ""
        self._capped = False
        self._last_content = ""

    def feed(self, completion: ChatCompletion) -> bool:
        """Record one round's answer; True when the plan is complete."""
        if self.done:
            raise RuntimeError("the conversation is already complete")
        self._rounds += 1
        self._usage += completion.usage
        if completion.model and not self._model:
            self._model = completion.model
        message = completion.message
        self.messages.append(message)
        content = _clean(message.content)
        if content:
            self._last_content = content
        if not message.tool_calls:
            self._summary = content or self._default_summary()
            self.done = True
            return True
        for call in message.tool_calls:
            self.messages.append(ToolMessage(call.id, self._answer(call)))
        if self._rounds >= self._max_rounds:
            # Invariant: the last assistant turn's calls are all answered, so the transcript
            # is a valid conversation even though we stop here.
            self._capped = True
            self._summary = self._capped_summary()
            self.done = True
        return self.done

    def _answer(self, call: ToolCall) -> str:
        offered = self.tools.get(call.name)
        if offered is None:
            self._calls.append(CallRecord(call.name, "none", "rejected"))
            names = ", ".join(self.tools) or "none"
            return _failure(f"tool {call.name!r} is not available; offered tools: {names}")
        if call.arguments is None:
            self._calls.append(CallRecord(call.name, offered.policy, "parse-failure"))
            why = call.arguments_error or "arguments are not a JSON object"
            return _failure(f"{why}; call {call.name} again with a JSON object of arguments")
        self._steps.append(offered.step(call.arguments))
        self._calls.append(CallRecord(call.name, offered.policy, "planned"))
        return ACCEPTED

    def _default_summary(self) -> str:
        n = len(self._steps)
        if n == 0:
            return "The planner proposed no steps."
        return f"The planner proposed {n} step{'s' if n != 1 else ''}."

    def _capped_summary(self) -> str:
        n = len(self._steps)
        note = (
            f"Planning stopped after {self._rounds} rounds while the model was still proposing "
            f"tool calls; {n} step{'s' if n != 1 else ''} recorded."
        )
        return f"{self._last_content}\n\n{note}" if self._last_content else note

    def result(self) -> PlanResult:
        if not self.done:
            raise RuntimeError("the conversation is not complete")
        return PlanResult(
            summary=self._summary[:_SUMMARY_LIMIT],
            steps=tuple(self._steps),
            rounds=self._rounds,
            usage=self._usage,
            parse_failures=sum(1 for c in self._calls if c.outcome == "parse-failure"),
            rejected_calls=sum(1 for c in self._calls if c.outcome == "rejected"),
            provider=self._provider,
            model=self._model,
            capped=self._capped,
            calls=tuple(self._calls),
        )


class LlmPlanner:
    """Plans with a language model over an OpenAI-compatible `ChatClient`."""

    def __init__(self, *, client: ChatClient, max_rounds: int = MAX_ROUNDS) -> None:
        self._client = client
        self._max_rounds = max_rounds

    @property
    def name(self) -> str:
        return self._client.provider

    async def plan(self, request: PlanRequest) -> PlanResult:
        conversation = PlanConversation(
            request,
            provider=self._client.provider,
            model=self._client.model,
            max_rounds=self._max_rounds,
        )
        while not conversation.done:
            completion = await self._client.complete(conversation.messages, conversation.specs)
            conversation.feed(completion)
        return conversation.result()


def _failure(message: str) -> str:
    return json.dumps({"success": False, "message": message})


def _clean(content: str | None) -> str:
    """Assistant text as a summary: reasoning blocks (`<think>...</think>`) removed, trimmed."""
    if not content:
        return ""
    return _THINK.sub("", content).strip()
