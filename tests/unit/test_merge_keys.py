"""The merge keys, the persisted form, and the merge's properties (commutative, idempotent,
order-independent; domain.md §2)."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.instants import format_stamp, parse_stamp
from core.json_types import JsonValue
from core.sync_changes import APP_ID, MISSIONS_TABLE
from projections.merge import (
    UNSTAMPED,
    RecordState,
    apply_row,
    key_created,
    key_event,
    key_stamp,
    keys_to_json,
    make_key,
    merge_states,
    mission_view,
    state_from_persisted,
    to_record,
)
from projections.rows import ChangeRow
from tests.fix_rows import ACCEPTED, DAY, NOW, REJECTED, fold, row, us

_ABSENT = object()


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
