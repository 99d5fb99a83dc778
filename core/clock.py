"""Clocks. Everything that reads time, or waits for a moment, takes one, so tests never
sleep for a deadline: they move a `ManualClock`, and whatever waits on it wakes."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now_us(self) -> int:
        """Wall-clock time: microseconds since the Unix epoch, UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start; never goes back. For timers and durations."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""
        ...


class SystemClock:
    def now_us(self) -> int:
        return time.time_ns() // 1000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock tests move by hand; `sleep` returns when the clock is moved past its end."""

    def __init__(self, now_us: int = 1_776_254_400_000_000, monotonic: float = 1000.0) -> None:
        self._now_us = now_us
        self._mono = monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now_us(self) -> int:
        return self._now_us

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many `sleep` calls wait on this clock (for tests: "is it asleep yet?")."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        self._now_us += int(seconds * 1_000_000)
        self._mono += seconds
        self._wake()

    def set_now_us(self, now_us: int) -> None:
        if now_us < self._now_us:
            raise ValueError("a ManualClock does not go back")
        self._mono += (now_us - self._now_us) / 1_000_000
        self._now_us = now_us
        self._wake()

    def _wake(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
