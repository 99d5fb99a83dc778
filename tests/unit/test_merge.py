"""The last-writer-wins merge (domain.md §2): predecessor cases, decisions, and properties."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.instants import format_stamp, parse_stamp
from core.json_types import JsonValue
from core.sync_changes import AGENTS_TABLE, APP_ID, MISSIONS_TABLE
from projections.merge import (
    UNSTAMPED,
    ApplyOutcome,
    RecordState,
    agent_view,
    apply_row,
    key_created,
    key_event,
    key_stamp,
    keys_to_json,
    make_key,
    merge_into,
    merge_states,
    mission_view,
    state_from_persisted,
    to_record,
)
from projections.rows import ChangeRow

NOW = "2026-04-15T12:00:00Z"
DAY = "2026-04-15T00:00:00Z"
_ABSENT = object()


def us(text: str) -> int:
    value = parse_stamp(text)
    assert value is not None, text
    return value


_counter = iter(range(1, 1_000_000))


def row(
    op: str,
    data: dict[str, JsonValue] | None,
    meta: dict[str, JsonValue] | None = None,
    *,
    created: str = DAY,
    event: str | None = None,
    record: str = "m1",
    user: str = "u1",
    table: str = MISSIONS_TABLE,
) -> ChangeRow:
    return ChangeRow(
        event_id=event if event is not None else f"ev-{next(_counter):06d}",
        app_id=APP_ID,
        table_name=table,
        record_id=record,
        user_id=user,
        op=op,
        data=data,
        field_meta={} if meta is None else meta,
        created_at_us=us(created),
    )


def fold(rows: Sequence[ChangeRow], user: str = "u1", record: str = "m1") -> RecordState:
    state = RecordState(user, record)
    for r in rows:
        apply_row(state, r)
    return state


def stamped(data: dict[str, JsonValue], stamp: JsonValue) -> dict[str, JsonValue]:
    return {k: stamp for k in data}


# --- predecessor cases (domain.md §2) ------------------------------------------------------


def test_active_insert_due_fields() -> None:
    state = fold([row("insert", {"id": "m1", "title": "x", "state": "active", "nextRunAt": DAY})])
    view = mission_view(state)
    assert view is not None
    assert view["title"] == "x" and view["state"] == "active" and view["nextRunAt"] == DAY
    assert view["id"] == "m1"
    assert us(str(view["nextRunAt"])) <= us(NOW)


def test_next_run_in_2099_kept() -> None:
    state = fold(
        [row("insert", {"title": "x", "state": "active", "nextRunAt": "2099-01-01T00:00:00Z"})]
    )
    view = mission_view(state)
    assert view is not None and view["nextRunAt"] == "2099-01-01T00:00:00Z"


def test_paused_kept() -> None:
    state = fold([row("insert", {"title": "x", "state": "paused", "nextRunAt": DAY})])
    view = mission_view(state)
    assert view is not None and view["state"] == "paused"


def test_insert_then_delete_is_gone() -> None:
    rows = [
        row("insert", {"title": "x", "state": "active", "nextRunAt": DAY}),
        row("delete", {"deletedAt": "2026-04-15T01:00:00Z"}, created="2026-04-15T01:00:00Z"),
    ]
    for order in (rows, rows[::-1]):
        state = fold(order)
        assert state.deleted and state.exists
        assert mission_view(state) is None and agent_view(state) is None


def test_later_stamp_wins_title() -> None:
    rows = [
        row("insert", {"title": "old"}, {"title": "2026-04-15T00:00:00Z"}),
        row("update", {"title": "new"}, {"title": "2026-04-15T01:00:00Z"}),
    ]
    for order in (rows, rows[::-1]):
        assert fold(order).values["title"] == "new"


def test_agent_stamp_beats_later_created_row() -> None:
    rows = [
        row("insert", {"name": "A"}, {"name": "2026-04-15T12:00:00Z"}, table=AGENTS_TABLE),
        row(
            "update",
            {"name": "B"},
            {"name": "2026-04-15T00:00:00Z"},
            created="2026-04-15T13:00:00Z",
            table=AGENTS_TABLE,
        ),
    ]
    for order in (rows, rows[::-1]):
        view = agent_view(fold(order))
        assert view is not None and view["name"] == "A"


def test_agent_with_deleted_at_is_dropped_mission_is_kept() -> None:
    data: dict[str, JsonValue] = {"name": "A", "deletedAt": "2026-04-14T00:00:00Z"}
    state = fold([row("insert", data, table=AGENTS_TABLE)])
    assert agent_view(state) is None
    view = mission_view(state)
    assert view is not None and view["deletedAt"] == "2026-04-14T00:00:00Z"


@pytest.mark.parametrize("value", [None, False, 0, ""])
def test_agent_falsy_deleted_at_is_live(value: JsonValue) -> None:
    assert agent_view(fold([row("insert", {"name": "A", "deletedAt": value})])) is not None


@pytest.mark.parametrize("value", ["2026-04-14T00:00:00Z", 1, True, [], {}])
def test_agent_truthy_deleted_at_is_dropped(value: JsonValue) -> None:
    assert agent_view(fold([row("insert", {"name": "A", "deletedAt": value})])) is None


def test_agent_undeleted_by_later_update() -> None:
    rows = [
        row("insert", {"name": "A", "deletedAt": DAY}, {"deletedAt": DAY}),
        row("update", {"deletedAt": None}, {"deletedAt": "2026-04-15T01:00:00Z"}),
    ]
    assert agent_view(fold(rows)) is not None


# --- stamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("2026-04-15T01:00:00Z", {"at": "2026-04-15T02:00:00Z", "origin": "user"}),
        ({"at": "2026-04-15T01:00:00Z", "actor": {"kind": "user"}}, "2026-04-15T02:00:00Z"),
    ],
)
def test_mixed_legacy_and_object_stamps(first: JsonValue, second: JsonValue) -> None:
    rows = [
        row("update", {"title": "early"}, {"title": first}),
        row("update", {"title": "late"}, {"title": second}),
    ]
    for order in (rows, rows[::-1]):
        state = fold(order)
        assert state.values["title"] == "late"
        assert to_record(state)["__fieldMeta"] == {"title": "2026-04-15T02:00:00.000Z"}


def test_object_stamp_no_longer_beats_later_iso_string() -> None:
    # The predecessor compared '[object Object]' > '2026-…' and kept the object's value forever.
    rows = [
        row("update", {"iterations": [1]}, {"iterations": {"at": "2026-04-15T00:00:00Z"}}),
        row("update", {"iterations": [1, 2]}, {"iterations": "2026-04-15T05:00:00Z"}),
    ]
    assert fold(rows).values["iterations"] == [1, 2]


def test_equal_stamps_fall_back_to_created_at_then_event_id() -> None:
    stamp: dict[str, JsonValue] = {"title": "2026-04-15T01:00:00Z"}
    by_created = [
        row("update", {"title": "a"}, stamp, created="2026-04-15T02:00:00Z", event="z"),
        row("update", {"title": "b"}, stamp, created="2026-04-15T03:00:00Z", event="a"),
    ]
    by_event = [
        row("update", {"title": "a"}, stamp, event="e1"),
        row("update", {"title": "b"}, stamp, event="e2"),
    ]
    for rows in (by_created, by_event):
        for order in (rows, rows[::-1]):
            assert fold(order).values["title"] == "b"


def test_zero_and_millisecond_text_are_the_same_instant() -> None:
    assert parse_stamp("2026-04-15T12:00:00Z") == parse_stamp("2026-04-15T12:00:00.000Z")
    rows = [
        row("update", {"title": "a"}, {"title": "2026-04-15T12:00:00.000Z"}, created=NOW),
        row("update", {"title": "b"}, {"title": "2026-04-15T12:00:00Z"}, created=DAY),
    ]
    # String compare would pick "a" ('.' < 'Z'); as instants they tie, and created_at decides.
    for order in (rows, rows[::-1]):
        assert fold(order).values["title"] == "a"


def test_non_z_offsets_compare_as_instants() -> None:
    rows = [
        row("update", {"title": "offset"}, {"title": "2026-04-15T03:00:00+02:00"}),  # 01:00Z
        row("update", {"title": "utc"}, {"title": "2026-04-15T02:00:00Z"}),
    ]
    for order in (rows, rows[::-1]):
        assert fold(order).values["title"] == "utc"


@pytest.mark.parametrize(
    "meta", [None, 5, 1.5, True, {}, {"at": 5}, {"at": None}, "garbage", "2026-04-15T01:00:00"]
)
def test_invalid_stamps_use_created_at_and_are_counted(meta: JsonValue) -> None:
    state = RecordState("u1", "m1")
    early = row("update", {"title": "stamped"}, {"title": "2026-04-15T01:30:00Z"})
    bad = row(
        "update",
        {"title": "bad", "x": 1},
        {"title": meta, "x": meta},
        created="2026-04-15T02:00:00Z",
    )
    assert apply_row(state, early) == ApplyOutcome(True, 0, True)
    outcome = apply_row(state, bad)
    assert outcome.invalid_stamps == 2 and outcome.changed
    assert state.values["title"] == "bad"
    assert key_stamp(state.keys["title"]) == us("2026-04-15T02:00:00Z")
    late = row("update", {"title": "late"}, {"title": "2026-04-15T02:00:01Z"})
    apply_row(state, late)
    assert state.values["title"] == "late"


def test_update_without_field_meta_entry_counts_as_invalid() -> None:
    outcome = apply_row(RecordState("u1", "m1"), row("update", {"title": "x"}, {}))
    assert outcome.invalid_stamps == 1


def test_unstamped_insert_field_loses_to_any_update() -> None:
    insert = row("insert", {"title": "insert"}, {}, created=NOW)
    updates = [
        row("update", {"title": "old-stamp"}, {"title": "1970-01-01T00:00:00Z"}),
        row("update", {"title": "invalid"}, {"title": None}, created="1990-01-01T00:00:00Z"),
    ]
    for update in updates:
        state = fold([insert, update])
        assert state.values["title"] == update.data["title"]  # type: ignore[index]
        assert fold([update, insert]) == state
    alone = fold([insert])
    assert key_stamp(alone.keys["title"]) == UNSTAMPED
    # An unstamped winner reports its row's created_at.
    assert to_record(alone)["__fieldMeta"] == {"title": "2026-04-15T12:00:00.000Z"}
    later = fold([insert, row("insert", {"title": "2nd"}, {}, created="2026-04-15T13:00:00Z")])
    assert later.values["title"] == "2nd"


def test_insert_with_null_stamp_is_invalid_not_unstamped() -> None:
    outcome = apply_row(RecordState("u1", "m1"), row("insert", {"title": "x"}, {"title": None}))
    assert outcome.invalid_stamps == 1


ACCEPTED = {
    "2026-04-15T12:00:00Z": "2026-04-15T12:00:00.000Z",
    "2026-04-15T12:00:00.5Z": "2026-04-15T12:00:00.500Z",
    "2026-04-15T12:00:00.123456Z": "2026-04-15T12:00:00.123456Z",
    "2026-04-15T12:00:00.123456789Z": "2026-04-15T12:00:00.123456Z",
    "2026-04-15T12:00:00.1234Z": "2026-04-15T12:00:00.123400Z",
    "2026-04-15 12:00:00+00": "2026-04-15T12:00:00.000Z",
    "2026-04-15T14:00:00+0200": "2026-04-15T12:00:00.000Z",
    "2026-04-15T14:00:00+02:00": "2026-04-15T12:00:00.000Z",
    "2026-04-15T06:30:00-05:30": "2026-04-15T12:00:00.000Z",
    "2026-04-15T12:00:00-00:00": "2026-04-15T12:00:00.000Z",
    "2026-04-16T00:30:00+23:59": "2026-04-15T00:31:00.000Z",
    "0001-01-01T00:30:00+01:00": "0000-12-31T23:30:00.000Z",
    "2024-02-29T00:00:00Z": "2024-02-29T00:00:00.000Z",
}

REJECTED = [
    "2026-04-15",
    "2026-04-15T12:00:00",
    "2026-04-15T12:00Z",
    "2026-04-15t12:00:00z",
    "2026-04-15X12:00:00Z",
    "20260415T120000Z",
    "2026-W16-3T12:00:00Z",
    "2026-04-15T12:00:00.Z",
    "2026-04-15T12:00:00.1234567890Z",
    "2026-04-15T23:59:60Z",
    "2026-04-15T24:00:00Z",
    "2026-13-01T00:00:00Z",
    "2025-02-29T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "2026-04-15T12:00:00+24:00",
    "2026-04-15T12:00:00+02:60",
    "2026-04-15T12:00:00+0260",
    "2026-04-15T12:00:00+2400",
    "2026-04-15T12:00:00Z ",
    " 2026-04-15T12:00:00Z",
    "2026-04-15T12:00:00Z\n",
    "\uff12\uff10\uff12\uff16-04-15T12:00:00Z"  # full-width digits,
    "",
    "x" * 10_000,
]


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


# --- deletes, duplicates, order --------------------------------------------------------------


def test_delete_is_terminal() -> None:
    insert = row("insert", {"title": "x"}, created=DAY)
    delete = row("delete", {"deletedAt": "2026-04-15T01:00:00Z"}, created="2026-04-15T01:00:00Z")
    late = row("insert", {"title": "back"}, {"title": NOW}, created=NOW)
    state = fold([insert, delete])
    assert apply_row(state, late) == ApplyOutcome(False, 0)
    assert apply_row(state, insert) == ApplyOutcome(False, 0)
    assert apply_row(state, delete) == ApplyOutcome(False, 0)
    assert state.deleted and mission_view(state) is None
    assert state.values == {} and state.keys == {}
    assert to_record(state) == {"id": "m1", "__fieldMeta": {}}


def test_delete_before_insert_arrives() -> None:
    state = RecordState("u1", "m1")
    assert apply_row(state, row("delete", None, created=NOW)) == ApplyOutcome(True, 0)
    assert not state.exists
    # The late insert flips `exists` (persisted) but creates nothing and brings no values.
    assert apply_row(state, row("insert", {"title": "x"})) == ApplyOutcome(True, 0, False)
    assert state.exists and state.deleted and state.values == {}
    assert mission_view(state) is None


def test_duplicate_row_changes_nothing() -> None:
    r = row("update", {"title": "x", "state": "active"}, {"title": NOW, "state": NOW})
    state = fold([r])
    before = state.copy()
    assert apply_row(state, r) == ApplyOutcome(False, 0)
    assert state == before


def test_out_of_created_at_order() -> None:
    rows = [
        row("insert", {"title": "a", "state": "active"}, created="2026-04-15T00:00:00Z"),
        row(
            "update",
            {"title": "b"},
            {"title": "2026-04-15T01:00:00Z"},
            created="2026-04-15T01:00:00Z",
        ),
        row(
            "update",
            {"state": "paused"},
            {"state": "2026-04-15T02:00:00Z"},
            created="2026-04-15T02:00:00Z",
        ),
    ]
    expected = fold(rows)
    assert fold([rows[2], rows[0], rows[1]]) == expected
    assert fold(rows[::-1]) == expected
    assert expected.values == {"title": "b", "state": "paused"}


def test_values_replaced_whole() -> None:
    rows = [
        row("insert", {"cadence": {"kind": "daily", "atHour": 9, "atMinute": 0}}),
        row("update", {"cadence": {"kind": "manual"}}, {"cadence": NOW}),
    ]
    assert fold(rows).values["cadence"] == {"kind": "manual"}


def test_reserved_fields_are_derived() -> None:
    state = fold([row("insert", {"id": "other", "__fieldMeta": {"t": 1}, "t": 1}, {"t": NOW})])
    assert set(state.values) == {"t"}
    assert to_record(state) == {
        "id": "m1",
        "t": 1,
        "__fieldMeta": {"t": "2026-04-15T12:00:00.000Z"},
    }


def test_fields_of_a_row_share_one_key() -> None:
    r = row("update", {"a": 1, "b": 2, "c": 3}, {"a": NOW, "b": {"at": NOW}, "c": DAY})
    state = fold([r])
    assert state.keys["a"] is state.keys["b"]
    assert state.keys["a"] == make_key(us(NOW), us(DAY), r.event_id)
    assert state.keys["c"] == make_key(us(DAY), us(DAY), r.event_id)
    assert key_event(state.keys["c"]) == r.event_id and key_created(state.keys["c"]) == us(DAY)


def test_keys_change_without_visible_change_is_a_change() -> None:
    state = fold([row("update", {"t": 1}, {"t": NOW}, created=DAY)])
    outcome = apply_row(state, row("update", {"t": 1}, {"t": NOW}, created=NOW))
    assert outcome.changed


def test_merge_rejects_other_record() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        merge_states(RecordState("u1", "m1"), RecordState("u1", "m2"))


def test_merge_bookkeeping_takes_the_later() -> None:
    from core.lsn import Lsn

    a = RecordState("u1", "m1", last_lsn=Lsn(5), last_applied_us=10)
    b = RecordState("u1", "m1", last_lsn=Lsn(7), last_applied_us=3)
    assert not merge_into(a, b)
    assert a.last_lsn == Lsn(7) and a.last_applied_us == 10


# --- merge keys ------------------------------------------------------------------------------

KEY_CASES = [
    (UNSTAMPED, us(DAY), "2c1e8a3e-5b8f-4d0e-9a57-3f0d1c2b4a69"),
    (us(NOW), us(DAY), "e1"),
    (-1, -(2**63), ""),
    (2**63 - 1, 0, "ünïcode \U0001f600 \x00"),
    (0, 1, "\ud800 lone surrogate"),
    (0, 1, "2C1E8A3E-5B8F-4D0E-9A57-3F0D1C2B4A69"),
]


@pytest.mark.parametrize(("stamp", "created", "event"), KEY_CASES)
def test_key_helpers_round_trip(stamp: int, created: int, event: str) -> None:
    key = make_key(stamp, created, event)
    assert type(key) is bytes
    assert (key_stamp(key), key_created(key), key_event(key)) == (stamp, created, event)


def test_key_of_a_canonical_uuid_is_52_bytes() -> None:
    key = make_key(us(NOW), us(DAY), str(uuid.uuid4()))
    assert len(key) == 8 + 8 + 36


def test_make_key_rejects_integers_beyond_64_bits() -> None:
    with pytest.raises(struct.error):
        make_key(2**63, 0, "e")
    with pytest.raises(struct.error):
        make_key(0, -(2**63) - 1, "e")


INT64 = st.integers(-(2**63), 2**63 - 1)
# Few distinct values as well as any, so that ties on stamp and created_at are common.
STAMPS = st.one_of(st.sampled_from([UNSTAMPED, -1, 0, 1, us(DAY), us(NOW)]), INT64)
CREATED = st.one_of(st.sampled_from([-1, 0, us(DAY)]), INT64)
UUID_TEXT = st.uuids(version=4).map(str)


def assert_same_order(a: tuple[int, int, str], b: tuple[int, int, str]) -> None:
    ka, kb = make_key(*a), make_key(*b)
    assert (ka < kb) == (a < b)
    assert (ka == kb) == (a == b)
    assert (ka > kb) == (a > b)


@settings(max_examples=500)
@given(STAMPS, CREATED, UUID_TEXT, STAMPS, CREATED, UUID_TEXT)
def test_key_order_is_tuple_order_for_canonical_uuids(
    s1: int, c1: int, e1: str, s2: int, c2: int, e2: str
) -> None:
    assert_same_order((s1, c1, e1), (s2, c2, e2))
    assert_same_order((s1, c1, e1), (s1, c1, e2))  # tie on stamp and created: the id decides
    assert_same_order((s1, c1, e1), (s1, c2, e1))


@settings(max_examples=500)
@given(
    STAMPS,
    CREATED,
    st.one_of(UUID_TEXT, st.text()),
    STAMPS,
    CREATED,
    st.one_of(UUID_TEXT, st.text()),
)
def test_key_order_is_tuple_order_for_any_ids(
    s1: int, c1: int, e1: str, s2: int, c2: int, e2: str
) -> None:
    assert_same_order((s1, c1, e1), (s2, c2, e2))
    assert_same_order((s1, c1, e1), (s1, c1, e2))
    key = make_key(s1, c1, e1)
    assert (key_stamp(key), key_created(key), key_event(key)) == (s1, c1, e1)


# --- persistence -----------------------------------------------------------------------------


def test_persisted_form() -> None:
    insert = row("insert", {"title": "x", "state": "active"}, {"state": NOW}, event="e1")
    state = fold([insert])
    assert keys_to_json(state) == {
        "title": [None, us(DAY), "e1"],
        "state": [us(NOW), us(DAY), "e1"],
    }
    again = state_from_persisted("u1", "m1", to_record(state), keys_to_json(state), deleted=False)
    assert again == state


@pytest.mark.parametrize(
    ("record", "keys"),
    [
        ({"title": "x"}, {}),
        ({}, {"title": [None, 0, "e"]}),
        ({"title": "x"}, {"title": [None, 0]}),
        ({"title": "x"}, {"title": ["2026", 0, "e"]}),
        ({"title": "x"}, {"title": [None, True, "e"]}),
        ({"title": "x"}, {"title": [None, 0, 5]}),
        ({"id": "m1"}, {"id": [None, 0, "e"]}),
        ({"title": "x"}, {"title": [2**63, 0, "e"]}),
        ({"title": "x"}, {"title": [None, -(2**63) - 1, "e"]}),
    ],
)
def test_state_from_persisted_rejects_mismatch(
    record: dict[str, JsonValue], keys: dict[str, JsonValue]
) -> None:
    with pytest.raises(ValueError):
        state_from_persisted("u1", "m1", record, keys, deleted=False)


def test_reloaded_fields_share_one_key_per_distinct_key() -> None:
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    rows = [
        row("insert", {"a": 1, "b": 2, "c": 3}, {}, event=ids[0]),
        row("update", {"b": 4, "c": 5}, {"b": NOW, "c": {"at": NOW}}, event=ids[1]),
    ]
    state = fold(rows)
    keys = orjson.loads(orjson.dumps(keys_to_json(state)))
    assert keys["b"] == keys["c"] == [us(NOW), us(DAY), ids[1]]
    again = state_from_persisted("u1", "m1", to_record(state), keys, deleted=False)
    assert again == state
    assert again.keys["b"] is again.keys["c"]
    assert again.keys["a"] == make_key(UNSTAMPED, us(DAY), ids[0])


def test_persisted_tombstone() -> None:
    state = state_from_persisted("u1", "m1", {"id": "m1"}, {}, deleted=True)
    assert state.deleted and not state.exists
    assert apply_row(state, row("insert", {"t": 1})).changed
    assert mission_view(state) is None


# --- properties ------------------------------------------------------------------------------

STAMP_CHOICES: list[object] = [
    "2026-04-15T01:00:00Z",
    "2026-04-15T01:00:00.000Z",
    "2026-04-15T03:00:00+02:00",
    "2026-04-15T02:00:00Z",
    {"at": "2026-04-15T02:00:00.000Z", "origin": "user"},
    {"at": "2026-04-15T00:30:00Z", "actor": {"kind": "ai"}},
    None,
    5,
    {},
    "garbage",
    _ABSENT,
    _ABSENT,
]
CREATED_CHOICES = [
    us("2026-04-15T00:00:00Z"),
    us("2026-04-15T01:00:00Z"),
    us("2026-04-15T02:00:00Z"),
]
FIELDS = ["title", "state", "nextRunAt", "deletedAt"]
VALUES = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.sampled_from(["a", "b"]),
    st.lists(st.integers(0, 2), max_size=2),
)


@st.composite
def raw_rows(draw: st.DrawFn, records: Sequence[str] = ("m1", "m2")) -> tuple[object, ...]:
    op = draw(st.sampled_from(["insert", "insert", "update", "update", "update", "delete"]))
    record = draw(st.sampled_from(records))
    created = draw(st.sampled_from(CREATED_CHOICES))
    fields = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=4))
    data = {name: draw(VALUES) for name in fields}
    meta = {}
    for name in fields:
        stamp = draw(st.sampled_from(STAMP_CHOICES))
        if stamp is not _ABSENT:
            meta[name] = stamp
    if op == "delete" and draw(st.booleans()):
        return (op, record, created, None, {})
    return (op, record, created, data, meta)


def event_id(i: int) -> str:
    """Unique ids of both kinds: like the tests' (`e001`) and like production's (a canonical
    UUID text, its order unrelated to `i`)."""
    if i % 2:
        return str(uuid.UUID(int=i * 0x9E3779B97F4A7C15_F39CC0605CEDC834 % 2**128))
    return f"e{i:03d}"


def build(raws: Sequence[tuple[object, ...]]) -> list[ChangeRow]:
    """Turn drawn tuples into rows with unique event ids (duplicates are built by the tests)."""
    out = []
    for i, (op, record, created, data, meta) in enumerate(raws):
        out.append(
            ChangeRow(
                event_id=event_id(i),
                app_id=APP_ID,
                table_name=MISSIONS_TABLE,
                record_id=str(record),
                user_id="u1",
                op=str(op),
                data=data,  # type: ignore[arg-type]
                field_meta=meta,  # type: ignore[arg-type]
                created_at_us=created,  # type: ignore[arg-type]
            )
        )
    return out


def fold_all(rows: Sequence[ChangeRow]) -> dict[str, RecordState]:
    states: dict[str, RecordState] = {}
    for r in rows:
        state = states.get(r.record_id)
        if state is None:
            state = states[r.record_id] = RecordState(r.user_id, r.record_id)
        apply_row(state, r)
    return states


def summary(states: dict[str, RecordState]) -> dict[str, tuple[object, ...]]:
    return {rid: (to_record(s), s.exists, s.deleted, keys_to_json(s)) for rid, s in states.items()}


@settings(max_examples=300)
@given(st.lists(raw_rows(), max_size=12), st.data())
def test_any_permutation_and_duplication_gives_the_same_result(
    raws: list[tuple[object, ...]], data: st.DataObject
) -> None:
    rows = build(raws)
    expected = fold_all(rows)
    shuffled = data.draw(st.permutations(rows))
    extra = data.draw(st.lists(st.sampled_from(rows), max_size=6)) if rows else []
    mixed = data.draw(st.permutations(shuffled + extra))
    got = fold_all(mixed)
    assert got == expected
    assert summary(got) == summary(expected)


def one_record(raws: list[tuple[object, ...]], offset: int) -> RecordState:
    rows = build(raws)
    rows = [
        ChangeRow(
            f"{offset}-{r.event_id}",
            r.app_id,
            r.table_name,
            "m1",
            r.user_id,
            r.op,
            r.data,
            r.field_meta,
            r.created_at_us,
        )
        for r in rows
    ]
    return fold(rows)


@settings(max_examples=300)
@given(
    st.lists(raw_rows(("m1",)), max_size=6),
    st.lists(raw_rows(("m1",)), max_size=6),
    st.lists(raw_rows(("m1",)), max_size=6),
)
def test_merge_is_a_join(
    r1: list[tuple[object, ...]], r2: list[tuple[object, ...]], r3: list[tuple[object, ...]]
) -> None:
    a, b, c = one_record(r1, 1), one_record(r2, 2), one_record(r3, 3)
    assert merge_states(a, b) == merge_states(b, a)
    assert merge_states(merge_states(a, b), c) == merge_states(a, merge_states(b, c))
    assert merge_states(a, a) == a
    assert merge_states(a, RecordState("u1", "m1")) == a
    before = a.copy()
    merge_states(a, b)
    assert a == before  # merge_states does not touch its arguments


@settings(max_examples=300)
@given(st.lists(raw_rows(("m1",)), max_size=12), st.data())
def test_split_fold_then_merge_equals_fold_all(
    raws: list[tuple[object, ...]], data: st.DataObject
) -> None:
    rows = build(raws)
    chosen = data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    left = [r for r, c in zip(rows, chosen, strict=True) if c]
    right = [r for r, c in zip(rows, chosen, strict=True) if not c]
    joined = merge_states(fold(left), fold(right))
    assert joined == fold(rows)
    assert to_record(joined) == to_record(fold(rows))


@settings(max_examples=300)
@given(st.lists(raw_rows(("m1",)), max_size=12), st.data())
def test_persist_reload_then_apply_rest_equals_apply_all(
    raws: list[tuple[object, ...]], data: st.DataObject
) -> None:
    rows = build(raws)
    split = data.draw(st.integers(0, len(rows)))
    state = fold(rows[:split])
    record = orjson.loads(orjson.dumps(to_record(state)))
    keys = orjson.loads(orjson.dumps(keys_to_json(state)))
    reloaded = state_from_persisted(
        "u1", "m1", record, keys, deleted=state.deleted, exists=state.exists
    )
    assert reloaded == state
    for r in rows[split:]:
        apply_row(reloaded, r)
    assert reloaded == fold(rows)
    assert to_record(reloaded) == to_record(fold(rows))


@settings(max_examples=200)
@given(st.lists(raw_rows(("m1",)), max_size=12))
def test_outcome_changed_iff_state_changed(raws: list[tuple[object, ...]]) -> None:
    state = RecordState("u1", "m1")
    for r in build(raws):
        before = state.copy()
        outcome = apply_row(state, r)
        assert outcome.changed == (state != before)
        assert outcome.created == (not before.exists and state.exists and not state.deleted)


@pytest.mark.parametrize("text", [*ACCEPTED, *REJECTED])
def test_apply_row_stamps_fields_exactly_like_parse_stamp(text: str) -> None:
    meta: dict[str, JsonValue] = {
        "a": text,
        "b": {"at": text},
        "c": text,
        "d": "2026-04-15T05:00:00Z",
    }
    r = row("update", {"a": 1, "b": 2, "c": 3, "d": 4}, meta, created=NOW)
    state = RecordState("u1", "m1")
    outcome = apply_row(state, r)
    expected = parse_stamp(text)
    assert outcome.invalid_stamps == (3 if expected is None else 0)
    for name in "abc":
        assert key_stamp(state.keys[name]) == (us(NOW) if expected is None else expected)
    assert key_stamp(state.keys["d"]) == us("2026-04-15T05:00:00Z")


@settings(max_examples=200)
@given(st.lists(raw_rows(("m1",)), max_size=12))
def test_persisted_forms_field_by_field(raws: list[tuple[object, ...]]) -> None:
    """`to_record` and `keys_to_json` format each run of shared keys once: the result is
    what formatting every field on its own gives."""
    state = fold(build(raws))
    expected_meta = {
        name: format_stamp(key_created(key) if key_stamp(key) == UNSTAMPED else key_stamp(key))
        for name, key in state.keys.items()
    }
    assert to_record(state) == {"id": "m1", **state.values, "__fieldMeta": expected_meta}
    assert keys_to_json(state) == {
        name: [
            None if key_stamp(key) == UNSTAMPED else key_stamp(key),
            key_created(key),
            key_event(key),
        ]
        for name, key in state.keys.items()
    }
    assert orjson.loads(orjson.dumps(keys_to_json(state))) == keys_to_json(state)
