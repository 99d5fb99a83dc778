"""Instants and their text forms: what leaves the service is JS `toISOString()` text."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from core.instants import format_stamp, iso_ms, parse_stamp
from writer.iterations import PlanStep, build_iteration

JS_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
AT = 1_776_254_400_409_497  # 2026-04-15T12:00:00.409497Z: an instant with microseconds


def test_iso_ms_is_to_iso_string_form() -> None:
    assert iso_ms(AT) == "2026-04-15T12:00:00.409Z"
    assert iso_ms(AT - 409_497) == "2026-04-15T12:00:00.000Z"
    assert format_stamp(AT) == "2026-04-15T12:00:00.409497Z"  # exact, for our own tables


instants = st.integers(min_value=0, max_value=253_402_300_799_999_999)  # years 1970..9999


@given(instants, instants)
def test_iso_ms_texts_order_as_their_instants(a: int, b: int) -> None:
    # The web app compares some stamps as strings (deriveUpdatedAt takes the maximum).
    ta, tb = iso_ms(a), iso_ms(b)
    assert JS_ISO.fullmatch(ta)
    if ta != tb:
        assert (ta < tb) == (a // 1000 < b // 1000)
    assert parse_stamp(ta) == a // 1000 * 1000


def test_an_iteration_carries_to_iso_string_times() -> None:
    iteration = build_iteration(
        iteration_id="i",
        started_us=AT,
        finished_us=AT + 1_234_567,
        summary="s",
        steps=[PlanStep("create_task", {"title": "x"}, "Create a task")],
    )
    assert iteration["startedAt"] == "2026-04-15T12:00:00.409Z"
    assert iteration["finishedAt"] == "2026-04-15T12:00:01.644Z"
