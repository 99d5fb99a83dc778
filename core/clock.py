"""Clocks. Everything that reads time takes one, so tests never sleep for a deadline."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_us(self) -> int:
        """Wall-clock time: microseconds since the Unix epoch, UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start; never goes back. For timers and durations."""
        ...


class SystemClock:
    def now_us(self) -> int:
        return time.time_ns() // 1000

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, now_us: int = 1_776_254_400_000_000, monotonic: float = 1000.0) -> None:
        self._now_us = now_us
        self._mono = monotonic

    def now_us(self) -> int:
        return self._now_us

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now_us += int(seconds * 1_000_000)
        self._mono += seconds

    def set_now_us(self, now_us: int) -> None:
        if now_us < self._now_us:
            raise ValueError("a ManualClock does not go back")
        self._mono += (now_us - self._now_us) / 1_000_000
        self._now_us = now_us
