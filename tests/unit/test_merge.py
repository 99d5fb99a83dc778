"""The last-writer-wins merge (domain.md §2): predecessor cases, decisions, and properties."""

from __future__ import annotations

import pytest

from core.instants import parse_stamp
from core.json_types import JsonValue
from core.sync_changes import AGENTS_TABLE
from projections.merge import (
    UNSTAMPED,
    ApplyOutcome,
    RecordState,
    agent_view,
    apply_row,
    key_created,
    key_event,
    key_stamp,
    make_key,
    merge_into,
    merge_states,
    mission_view,
    to_record,
)
from tests.fix_rows import DAY, NOW, fold, row, us

_ABSENT = object()


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
