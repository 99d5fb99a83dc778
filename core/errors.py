"""The root of the exception tree, and the two errors every layer may raise.

Each layer keeps its own errors as subclasses of `MissionRunnerError` (stream.errors,
projections.errors, planner.errors, writer.errors); each carries the context a person
needs to act on it as attributes.
"""

from __future__ import annotations


class MissionRunnerError(Exception):
    """Root of every error mission-runner raises on purpose."""


class ConfigurationError(MissionRunnerError):
    """A setting is missing or wrong. `setting` names the environment variable to change."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class SetupError(MissionRunnerError):
    """The database is not set up the way we need (table, publication, privileges, slot
    owner, schema). Fatal at start; `problem` says what is wrong, `fix` what to change."""

    def __init__(self, problem: str, *, fix: str | None = None, slot: str | None = None) -> None:
        text = problem if fix is None else f"{problem}\n  fix: {fix}"
        super().__init__(text)
        self.problem = problem
        self.fix = fix
        self.slot = slot
