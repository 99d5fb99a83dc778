"""`mission-runner doctor`: every check of server and role, each with its fix.

The checks are `mission_runner.checks.SERVICE`, the ones start-up enforces: what doctor
reports as a failure that stops the start is what `run` refuses to start with.
"""

from __future__ import annotations

import psycopg

from mission_runner import checks
from mission_runner.checks import FAIL, OK, WARN, Check
from mission_runner.preflight import read_facts
from mission_runner.settings import Settings

__all__ = ["FAIL", "OK", "WARN", "Check", "format_checks", "run_checks"]


async def run_checks(
    conn: psycopg.AsyncConnection[tuple[object, ...]], settings: Settings
) -> list[Check]:
    """Every check that applies, in order."""
    return checks.evaluate(await read_facts(conn, settings), checks.SERVICE)


def format_checks(checks: list[Check]) -> str:
    marks = {OK: "[ok]  ", WARN: "[warn]", FAIL: "[FAIL]"}
    lines = []
    for c in checks:
        lines.append(f"{marks[c.result]} {c.problem}")
        if c.fix and c.result != OK:
            lines.append(f"         fix: {c.fix}")
    return "\n".join(lines)
