"""The due index and the scheduler loop: no polling, a heap on time plus a wake-up event.

The shape is psycopg_pool's scheduler: entries in a heap keyed on time, a task sleeping until
the earliest one, and an event that wakes it when something sooner arrives. Every applied
transaction updates the index (`set`), so the loop never queries the event log.

Invariants:
- The index holds at most one live entry per mission: the occurrence it should run next and
  the earliest time to consider it (`not_before`, used to re-check a budget-skipped mission
  when the budget frees). Replaced entries stay in the heap and are skipped when popped.
- `pop_due` hands each due entry out once and removes it; the caller owns it from then on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from core.clock import Clock
from planner.due import MissionKey, Occurrence


class DueIndex:
    """Occurrences by the time they become due. Pure: time is passed in.

    Each live mission has one heap entry `(when, seq, occurrence)`; `_live` maps the mission
    to that same tuple, so an entry is current exactly when `_live` holds it (identity).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Occurrence]] = []
        self._live: dict[MissionKey, tuple[int, int, Occurrence]] = {}
        self._seq = itertools.count()

    def set(self, occurrence: Occurrence, *, not_before: int | None = None) -> bool:
        """Schedule (or reschedule) a mission; True when it became the earliest entry."""
        when = occurrence.at_us if not_before is None else max(occurrence.at_us, not_before)
        current = self._live.get(occurrence.key)
        if current is not None and current[0] == when and current[2] == occurrence:
            return False
        earliest = self.next_at()
        entry = (when, next(self._seq), occurrence)
        self._live[occurrence.key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._compact()
        return earliest is None or when < earliest

    def discard(self, key: MissionKey) -> None:
        self._live.pop(key, None)

    def get(self, key: MissionKey) -> Occurrence | None:
        entry = self._live.get(key)
        return None if entry is None else entry[2]

    def _compact(self) -> None:
        self._heap = list(self._live.values())
        heapq.heapify(self._heap)

    def _clean_top(self) -> None:
        heap = self._heap
        live = self._live
        while heap:
            entry = heap[0]
            if live.get(entry[2].key) is entry:
                return
            heapq.heappop(heap)

    def next_at(self) -> int | None:
        self._clean_top()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now_us: int) -> list[Occurrence]:
        due: list[Occurrence] = []
        while True:
            self._clean_top()
            if not self._heap or self._heap[0][0] > now_us:
                return due
            _when, _seq, occurrence = heapq.heappop(self._heap)
            del self._live[occurrence.key]
            due.append(occurrence)

    def due_count(self, now_us: int) -> int:
        return sum(1 for entry in self._live.values() if entry[0] <= now_us)

    def upcoming(self, limit: int) -> list[tuple[int, Occurrence]]:
        """The next `limit` entries by time (for the status page)."""
        return [(when, occ) for when, _s, occ in heapq.nsmallest(limit, self._live.values())]

    def __len__(self) -> int:
        return len(self._live)


class Scheduler:
    """Waits until the earliest entry is due (sleeping on the injected clock) and returns the
    due occurrences to its owner (`next_due`); only while enabled."""

    def __init__(self, *, clock: Clock) -> None:
        self.index = DueIndex()
        self._clock = clock
        self._wake = asyncio.Event()
        self._enabled = False

    def set(self, occurrence: Occurrence, *, not_before: int | None = None) -> None:
        if self.index.set(occurrence, not_before=not_before):
            self._wake.set()

    def discard(self, key: MissionKey) -> None:
        self.index.discard(key)

    def clear(self) -> None:
        """Forget every entry (the snapshots were reloaded)."""
        self.index = DueIndex()
        self._wake.set()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        """Start handing out due occurrences (this instance leads and has caught up)."""
        self._enabled = True
        self._wake.set()

    def disable(self) -> None:
        """Stop handing out due occurrences; entries stay indexed."""
        self._enabled = False
        self._wake.set()

    def _delay(self) -> float | None:
        """Seconds until the next entry is due (None: nothing to wait for)."""
        next_at = self.index.next_at() if self._enabled else None
        if next_at is None:
            return None
        return max(0.0, (next_at - self._clock.now_us()) / 1_000_000)

    async def next_due(self, stop: asyncio.Event) -> list[Occurrence] | None:
        """The occurrences due now, once there are any (and the scheduler is enabled); None
        when `stop` is set first. Each is handed out once: the caller owns it."""
        while not stop.is_set():
            self._wake.clear()
            if self._enabled:
                due = self.index.pop_due(self._clock.now_us())
                if due:
                    return due
            delay = self._delay()
            waiters: list[asyncio.Future[object]] = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._wake.wait()),
            ]
            if delay is not None:
                waiters.append(asyncio.ensure_future(self._clock.sleep(delay)))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
        return None
