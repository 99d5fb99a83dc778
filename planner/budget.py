"""Per-agent token usage over a rolling 24-hour window, in memory. Pure (time is passed in).

Loaded from `mana_ai.token_usage` at start and appended after each plan; the database keeps
48 hours (older rows are pruned), the window looks at 24.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW_US = 24 * 3600 * 1_000_000

AgentKey = tuple[str, str]  # (user_id, agent_id)


@dataclass(slots=True)
class _Usage:
    entries: deque[tuple[int, int]] = field(default_factory=deque)  # (ts_us, tokens), by ts
    total: int = 0


class TokenBudget:
    def __init__(self) -> None:
        self._usage: dict[AgentKey, _Usage] = {}

    def add(self, agent: AgentKey, tokens: int, ts_us: int) -> None:
        if tokens <= 0:
            return
        usage = self._usage.setdefault(agent, _Usage())
        entries = usage.entries
        if entries and ts_us < entries[-1][0]:
            # Loading may arrive out of order; keep the deque sorted.
            items = sorted([*entries, (ts_us, tokens)])
            usage.entries = deque(items)
        else:
            entries.append((ts_us, tokens))
        usage.total += tokens

    def _expire(self, usage: _Usage, now_us: int) -> None:
        cutoff = now_us - WINDOW_US
        entries = usage.entries
        while entries and entries[0][0] <= cutoff:
            usage.total -= entries.popleft()[1]

    def used(self, agent: AgentKey, now_us: int) -> int:
        """Tokens of the agent in the 24 hours before `now_us`."""
        usage = self._usage.get(agent)
        if usage is None:
            return 0
        self._expire(usage, now_us)
        if not usage.entries:
            del self._usage[agent]
            return 0
        return usage.total

    def frees_at(self, agent: AgentKey, now_us: int) -> int | None:
        """When the oldest usage in the window leaves it (a budget-skipped mission may then
        run), or None without usage."""
        usage = self._usage.get(agent)
        if usage is None:
            return None
        self._expire(usage, now_us)
        return usage.entries[0][0] + WINDOW_US if usage.entries else None
