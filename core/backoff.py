"""The one retry backoff policy: exponential, capped, with jitter.

Every retry loop uses it (reconnecting the stream, waiting for the database at start and
after an outage, persisting, the leader lock, planner attempts, failed dispatches), each with
its own first delay and cap. "Equal jitter": the n-th delay is uniform in [d/2, d] where
d = min(cap, first * factor**(n-1)), so concurrent retriers spread out but never retry
sooner than half the nominal delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float
    """Nominal delay before the first retry, in seconds."""
    cap: float
    """No delay is longer than this."""
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.first <= 0 or self.cap < self.first or self.factor < 1:
            raise ValueError(f"invalid backoff: first {self.first}, cap {self.cap}")

    def nominal(self, attempt: int) -> float:
        """The delay before retry number `attempt` (1 is the first retry), without jitter."""
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        exponent = min(attempt - 1, 64)  # beyond that every delay is the cap
        return min(self.cap, self.first * self.factor**exponent)

    def delay(self, attempt: int, *, at_least: float | None = None) -> float:
        """Seconds to wait before retry number `attempt`. `at_least` (a server's
        Retry-After, say) raises it, still within the cap."""
        nominal = self.nominal(attempt)
        value = self.rng.uniform(nominal / 2, nominal)
        if at_least is not None:
            value = max(value, min(at_least, self.cap))
        return value
