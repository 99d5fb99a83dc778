"""Instants and their text forms: what leaves the service is JS `toISOString()` text."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.instants import format_stamp, iso_ms, parse_stamp
from tests.fix_rows import ACCEPTED, NOW, REJECTED, us
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


# --- the stamp grammar (domain.md §2) and the exact form --------------------------------


@pytest.mark.parametrize(("text", "utc"), ACCEPTED.items())
def test_parse_stamp_accepts(text: str, utc: str) -> None:
    stamp = parse_stamp(text)
    assert stamp is not None
    assert format_stamp(stamp) == utc
    assert parse_stamp({"at": text, "origin": "user"}) == stamp


@pytest.mark.parametrize("text", REJECTED)
def test_parse_stamp_rejects(text: str) -> None:
    assert parse_stamp(text) is None
    assert parse_stamp({"at": text}) is None


@pytest.mark.parametrize("value", [None, 0, 1.5, True, [], ["2026-04-15T12:00:00Z"], {"time": NOW}])
def test_parse_stamp_rejects_non_text(value: object) -> None:
    assert parse_stamp(value) is None


def test_format_stamp_precision() -> None:
    base = us("2026-04-15T12:00:00Z")
    assert format_stamp(base) == "2026-04-15T12:00:00.000Z"
    assert format_stamp(base + 123_000) == "2026-04-15T12:00:00.123Z"
    assert format_stamp(base + 123_456) == "2026-04-15T12:00:00.123456Z"
    assert format_stamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_stamp(-1) == "1969-12-31T23:59:59.999999Z"
    year_zero = us("0001-01-01T00:00:00Z") - 86_400_000_000 * 366
    assert format_stamp(year_zero) == "0000-01-01T00:00:00.000Z"
    assert format_stamp(year_zero - 1_000) == "-000001-12-31T23:59:59.999Z"
    assert format_stamp(us("9999-12-31T23:59:59Z") + 1_000_000) == "+010000-01-01T00:00:00.000Z"


_DT_MIN = -62135596800 * 1_000_000
_DT_MAX = 253402300799 * 1_000_000


@given(st.integers(min_value=_DT_MIN, max_value=_DT_MAX + 999_999))
def test_format_stamp_matches_datetime_and_round_trips(value: int) -> None:
    text = format_stamp(value)
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)
    assert text[:19] == dt.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0")
    assert parse_stamp(text) == value
