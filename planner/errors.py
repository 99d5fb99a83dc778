"""Errors of the planner layer."""

from __future__ import annotations

from core.errors import MissionRunnerError


class PlannerError(MissionRunnerError):
    """The planner failed. `kind` is the provider's error kind (or ours: unreachable, timeout)."""

    def __init__(self, kind: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retryable = retryable
