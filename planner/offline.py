"""The offline planner: a deterministic backend for when no `PLANNER_URL` is configured.

It lets a demo (or a developer without an LLM) see the whole pipeline - due mission, gates,
prompt, plan, iteration written back, review in the app - with plans that are plausible rather
than clever. Results say `provider = "offline"`, use zero tokens and zero LLM rounds.

How it plans, given the plaintext mission brief (title, concept, objective) and the offered tools:
1. Words: the mission text is split into lower-case words; stop words (English and German) are
   dropped; a crude stemmer and a small synonym table map e.g. "Termin", "meeting" and
   "appointment" to `event`, "Aufgaben" and "todos" to `task`.
2. Score: each distinct mission word scores 3 when it is a word of the tool's name (1 for a
   generic verb such as "create"), else 2 for its module, else 1 for a word of its description;
   a tool that matches only generic verbs scores 0. Only tools whose required parameters can
   be filled are candidates (tools that need the id of an existing record never are: the
   offline planner does not know any).
3. Choose: the best `max_steps` (default 3) tools with a positive score, ties broken by catalog
   order. No match: one fallback tool (`create_task`, `create_note` or `add_journal_entry`,
   whichever is offered first; else the first fillable tool); nothing offered: no steps.
4. Parameters: every required parameter gets the schema `default`, else the first `enum` value,
   else a value of its type - strings from the mission text (title-like names from the title,
   body-like ones from the objective), `date` = tomorrow, `date-time` = tomorrow 09:00 UTC (from
   the injected clock), numbers from `minimum`, booleans false, arrays and objects empty -
   respecting `minLength`/`maxLength`.
The same request and clock reading always give the same plan.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from core.clock import Clock
from core.instants import datetime_to_us, iso_ms
from core.json_types import JsonValue
from planner.catalog import ToolSpec
from planner.chat import Usage
from planner.loop import CallRecord, PlanRequest, PlanResult
from planner.policy import OfferedTool
from planner.prompt import MissionBrief
from writer.iterations import PlanStep

PROVIDER = "offline"
MAX_STEPS = 3
FALLBACK_TOOLS = ("create_task", "create_note", "add_journal_entry")

_WORD = re.compile(r"[^\W_]+")
_STOP = frozenset(
    # English
    "a an and are as at be by can do for from has have how i in into is it its me my new of on "
    "or our so than that the their them then this to up use user users we what when which who "
    "will with you your existing optional only read runs client also each every about more "
    # German
    "der die das den dem des ein eine einen einem einer und oder ist sind mit für fur von zu zum "
    "zur im in auf aus bei wie was wer wir ich du sie es mein meine dein nicht auch noch nach "
    "über uber unter vor jede jeden jeder alle neue neuen".split()
)
_SYNONYMS = {
    "task": ("todo", "aufgabe", "aufgab", "erledig", "chore", "checklist"),
    "note": ("notiz", "notizen", "write", "writ", "document", "dokument", "aufschreib", "idea"),
    "event": (
        "meeting",
        "meet",
        "termin",
        "appointment",
        "kalend",
        "calendar",
        "treff",
        "call",
        "schedul",
        "plan",
    ),
    "journal": ("tagebuch", "diary", "reflect", "reflection", "reflektier", "review"),
    "goal": ("ziel", "target", "habit", "progress", "fortschritt", "milestone"),
    "kontext": ("context", "remember", "merk", "fact"),
    "profile": ("profil",),
}
_CANON = {alias: canon for canon, aliases in _SYNONYMS.items() for alias in aliases}
_BODY_LIKE = ("content", "description", "text", "body", "note", "message", "details", "reason")


class OfflinePlanner:
    """A `Planner` that needs no language model (see the module doc)."""

    name = PROVIDER

    def __init__(self, *, clock: Clock, max_steps: int = MAX_STEPS) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        self._clock = clock
        self._max_steps = max_steps

    async def plan(self, request: PlanRequest) -> PlanResult:
        return plan_offline(request, now_us=self._clock.now_us(), max_steps=self._max_steps)


def plan_offline(request: PlanRequest, *, now_us: int, max_steps: int = MAX_STEPS) -> PlanResult:
    """The offline plan for `request` at wall-clock time `now_us` (pure)."""
    now = datetime.fromtimestamp(now_us / 1_000_000, tz=UTC)
    brief = request.brief
    chosen: list[tuple[OfferedTool, dict[str, JsonValue]]] = []
    for tool in choose_tools(brief, request.tools, now=now, max_steps=max_steps):
        params = fill_params(tool.spec, brief, now=now)
        if params is not None:  # always true: choose_tools only returns fillable tools
            chosen.append((tool, params))
    steps = tuple(t.step(p) for t, p in chosen)
    matched = bool(_matches(brief, [t for t, _ in chosen]))
    return PlanResult(
        summary=_summary(brief, steps, matched=matched),
        steps=steps,
        rounds=0,
        usage=Usage(),
        parse_failures=0,
        rejected_calls=0,
        provider=PROVIDER,
        model=PROVIDER,
        calls=tuple(CallRecord(s.tool_name, s.policy, "planned") for s in steps),
    )


def choose_tools(
    brief: MissionBrief, tools: Sequence[OfferedTool], *, now: datetime, max_steps: int = MAX_STEPS
) -> tuple[OfferedTool, ...]:
    """The tools to propose, best first (see the module doc, steps 1-3)."""
    fillable = [t for t in tools if fill_params(t.spec, brief, now=now) is not None]
    if not fillable:
        return ()
    matched = _matches(brief, fillable)
    if matched:
        return matched[:max_steps]
    by_name = {t.name: t for t in fillable}
    for name in FALLBACK_TOOLS:
        if name in by_name:
            return (by_name[name],)
    return (fillable[0],)


def _matches(brief: MissionBrief, tools: Sequence[OfferedTool]) -> tuple[OfferedTool, ...]:
    """Tools with a positive score, best first; ties in the order given (catalog order)."""
    words = _words(" ".join((brief.title, brief.concept, brief.objective)))
    scored = [(_score(words, t.spec), index, t) for index, t in enumerate(tools)]
    ranked = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))
    return tuple(t for _, _, t in ranked)


def _score(words: frozenset[str], tool: ToolSpec) -> int:
    """Keyword overlap; 0 unless some non-verb word matches (a verb alone says too little)."""
    name_words = _words(tool.name.replace("_", " "))
    module_words = _words(tool.module)
    description_words = _words(tool.description)
    score = 0
    topical = False
    for word in words:
        if word in name_words:
            score += 1 if word in _VERBS else 3
        elif word in module_words:
            score += 2
        elif word in description_words:
            score += 1
        else:
            continue
        topical = topical or word not in _VERBS
    return score if topical else 0


def _words(text: str) -> frozenset[str]:
    out: set[str] = set()
    for raw in _WORD.findall(text.lower()):
        if raw in _STOP or len(raw) < 3 or raw.isdigit():
            continue
        out.add(_CANON.get(raw) or _CANON.get(_stem(raw)) or _stem(raw))
    return frozenset(out)


def _stem(word: str) -> str:
    for suffix in ("ing", "ies", "es", "ed", "en", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


_VERBS = frozenset(
    _stem(v)
    for v in (
        "create add update complete reschedule move append remove delete cancel list search get "
        "make record set change erstellen anlegen hinzufügen"
    ).split()
)


def fill_params(
    tool: ToolSpec, brief: MissionBrief, *, now: datetime
) -> dict[str, JsonValue] | None:
    """Values for every required parameter of `tool`, or None when one cannot be filled."""
    params: dict[str, JsonValue] = {}
    for name in tool.required:
        schema = tool.properties.get(name)
        value = _value(name, schema if isinstance(schema, dict) else {}, brief, now)
        if value is None:
            return None
        params[name] = value
    return params


def _value(
    name: str, schema: dict[str, JsonValue], brief: MissionBrief, now: datetime
) -> JsonValue:
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and enum[0] is not None:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if isinstance(k, str) and k != "null"), None)
    minimum = schema.get("minimum")
    match kind:
        case "string":
            return _string(name, schema, brief, now)
        case "integer":
            return int(minimum) if isinstance(minimum, int | float) else 1
        case "number":
            return minimum if isinstance(minimum, int | float) else 0
        case "boolean":
            return False
        case "array":
            return []
        case "object":
            return {}
        case _:
            return None


def _string(
    name: str, schema: dict[str, JsonValue], brief: MissionBrief, now: datetime
) -> str | None:
    tomorrow = now + timedelta(days=1)
    match schema.get("format"):
        case "date":
            return tomorrow.date().isoformat()
        case "date-time":
            nine = tomorrow.replace(hour=9, minute=0, second=0, microsecond=0)
            return iso_ms(datetime_to_us(nine))  # the web app's toISOString() form
    lower = name.lower()
    if lower == "id" or name.endswith("Id") or lower.endswith("_id"):
        return None  # the id of an existing record: the offline planner knows none
    title = brief.title or _first_line(brief.objective) or "Mission follow-up"
    body = brief.objective or brief.concept or brief.title or "Follow up on this mission."
    # Body-like names (content, description, ...) get the objective; all others the title.
    text = body if any(h in lower for h in _BODY_LIKE) else title
    max_length = schema.get("maxLength")
    if isinstance(max_length, int) and max_length > 0 and len(text) > max_length:
        text = text[: max_length - 1].rstrip() + "\u2026" if max_length > 1 else text[:1]
    min_length = schema.get("minLength")
    if isinstance(min_length, int) and len(text) < min_length:
        text = text.ljust(min_length, ".")
    return text


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _summary(brief: MissionBrief, steps: Sequence[PlanStep], *, matched: bool) -> str:
    head = "Offline plan (no language model is configured)"
    subject = f' for "{brief.title}"' if brief.title else ""
    if not steps:
        return f"{head}{subject}: no offered tool fits, so nothing is proposed."
    names = ", ".join(s.tool_name for s in steps)
    n = len(steps)
    how = (
        "chosen by keyword match with the mission text"
        if matched
        else "as a generic first step (no tool matched the mission text)"
    )
    return (
        f"{head}{subject}: {n} step{'s' if n != 1 else ''} {how}: {names}. Review before applying."
    )
