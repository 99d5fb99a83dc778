"""The in-memory snapshot stores: routing, dirty tracking, live counts, restore and merge."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.json_types import JsonValue
from core.lsn import Lsn
from core.sync_changes import AGENTS_TABLE, APP_ID, MISSIONS_TABLE
from projections.merge import (
    ApplyOutcome,
    RecordState,
    keys_to_json,
    state_from_persisted,
    to_record,
)
from projections.rows import ChangeRow
from projections.stores import Kind, SnapshotStore

T0 = 1_776_211_200_000_000  # 2026-04-15T00:00:00Z
HOUR = 3_600_000_000
_events = iter(range(1, 1_000_000))


def row(
    op: str,
    data: dict[str, JsonValue] | None,
    *,
    record: str = "m1",
    user: str = "u1",
    table: str = MISSIONS_TABLE,
    created: int = T0,
    stamp: str | None = None,
    event: str | None = None,
) -> ChangeRow:
    meta: dict[str, JsonValue] = {} if stamp is None or data is None else dict.fromkeys(data, stamp)
    return ChangeRow(
        event_id=event or f"ev{next(_events):06d}",
        app_id=APP_ID,
        table_name=table,
        record_id=record,
        user_id=user,
        op=op,
        data=data,
        field_meta=meta,
        created_at_us=created,
    )


def test_apply_creates_and_marks_dirty() -> None:
    store = SnapshotStore("mission")
    r = row("insert", {"title": "x"})
    assert store.apply(r) == ApplyOutcome(True, 0, True)
    assert len(store) == 1 and store.live_count() == 1 and store.dirty_count() == 1
    state = store.get("u1", "m1")
    assert state is not None and state.values == {"title": "x"}
    assert ("u1", "m1") in store
    assert list(store) == [state]
    assert store.take_dirty() == [state]
    assert store.take_dirty() == []
    assert store.apply(r) == ApplyOutcome(False, 0)
    assert store.dirty_count() == 0
    view = store.view("u1", "m1")
    assert view is not None and view["title"] == "x"
    assert store.view("u1", "nope") is None and store.get("u2", "m1") is None


def test_users_are_separate() -> None:
    store = SnapshotStore("mission")
    store.apply(row("insert", {"title": "mine"}, user="u1"))
    store.apply(row("insert", {"title": "theirs"}, user="u2"))
    assert len(store) == 2
    assert store.view("u1", "m1")["title"] == "mine"  # type: ignore[index]
    assert store.view("u2", "m1")["title"] == "theirs"  # type: ignore[index]


def test_take_dirty_is_in_change_order_and_deduplicated() -> None:
    store = SnapshotStore("mission")
    for rid in ("a", "b", "a", "c"):
        store.apply(row("update", {"n": rid}, record=rid, stamp="2026-04-15T01:00:00Z"))
    assert [s.record_id for s in store.take_dirty()] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("kind", "app", "table"),
    [
        ("mission", APP_ID, AGENTS_TABLE),
        ("agent", APP_ID, MISSIONS_TABLE),
        ("mission", "todo", MISSIONS_TABLE),
    ],
)
def test_rows_of_other_tables_are_refused(kind: Kind, app: str, table: str) -> None:
    store = SnapshotStore(kind)
    r = row("insert", {"title": "x"}, table=table)
    r = ChangeRow(
        r.event_id,
        app,
        r.table_name,
        r.record_id,
        r.user_id,
        r.op,
        r.data,
        r.field_meta,
        r.created_at_us,
    )
    with pytest.raises(ValueError, match="store got a row"):
        store.apply(r)
    assert len(store) == 0


def test_unknown_kind() -> None:
    with pytest.raises(ValueError):
        SnapshotStore("todo")  # type: ignore[arg-type]


def test_live_count_missions() -> None:
    store = SnapshotStore("mission")
    store.apply(row("insert", {"title": "x"}, record="a"))
    store.apply(row("insert", {"title": "y", "deletedAt": "2026-04-15T00:00:00Z"}, record="b"))
    assert store.live_count() == 2  # missions keep a soft-deleted record
    store.apply(row("delete", {}, record="a", created=T0 + HOUR))
    assert store.live_count() == 1 and len(store) == 2
    store.apply(row("delete", None, record="z"))  # tombstone first
    assert store.live_count() == 1 and len(store) == 3
    store.apply(row("insert", {"title": "late"}, record="z"))
    assert store.live_count() == 1


def test_live_count_agents_follow_deleted_at() -> None:
    store = SnapshotStore("agent")
    store.apply(row("insert", {"name": "A"}, table=AGENTS_TABLE))
    assert store.live_count() == 1
    store.apply(row("update", {"deletedAt": "x"}, table=AGENTS_TABLE, stamp="2026-04-15T01:00:00Z"))
    assert store.live_count() == 0 and store.view("u1", "m1") is None
    store.apply(
        row("update", {"deletedAt": None}, table=AGENTS_TABLE, stamp="2026-04-15T02:00:00Z")
    )
    assert store.live_count() == 1 and store.view("u1", "m1") is not None


def persisted(state: RecordState) -> RecordState:
    record = orjson.loads(orjson.dumps(to_record(state)))
    keys = orjson.loads(orjson.dumps(keys_to_json(state)))
    return state_from_persisted(
        state.user_id, state.record_id, record, keys, deleted=state.deleted, exists=state.exists
    )


def test_restore_is_clean_and_counts_live() -> None:
    source = SnapshotStore("mission")
    source.apply(row("insert", {"title": "x"}, record="a"))
    source.apply(row("insert", {"title": "y"}, record="b"))
    source.apply(row("delete", None, record="b"))
    store = SnapshotStore("mission")
    assert store.restore(persisted(s) for s in source) == 2
    assert len(store) == 2 and store.live_count() == 1 and store.dirty_count() == 0
    assert store.get("u1", "a") == source.get("u1", "a")


def test_restore_joins_with_rows_applied_before_the_load() -> None:
    stored = SnapshotStore("mission")
    stored.apply(row("insert", {"title": "db"}, stamp="2026-04-15T01:00:00Z"))
    from_db = persisted(next(iter(stored)))

    store = SnapshotStore("mission")
    store.apply(row("update", {"state": "paused"}, stamp="2026-04-15T02:00:00Z"))
    store.restore([from_db.copy()])
    state = store.get("u1", "m1")
    assert state is not None and state.values == {"title": "db", "state": "paused"}
    assert store.take_dirty() == [state]  # the database copy lacks `state`
    assert store.live_count() == 1

    again = SnapshotStore("mission")
    again.apply(row("insert", {"title": "db"}, stamp="2026-04-15T00:00:00Z"))  # older
    again.restore([from_db.copy()])
    assert again.dirty_count() == 0 and again.get("u1", "m1") == from_db
    assert again.live_count() == 1


# --- properties ------------------------------------------------------------------------------

OPS = st.sampled_from(["insert", "update", "update", "delete"])
RECORDS = st.sampled_from(["a", "b", "c"])
USERS = st.sampled_from(["u1", "u2"])
STAMPS = st.sampled_from([None, "2026-04-15T01:00:00Z", "2026-04-15T02:00:00+01:00", "bad"])
DATA: st.SearchStrategy[dict[str, JsonValue]] = st.fixed_dictionaries(
    {},
    optional={
        "title": st.sampled_from(["x", "y"]),
        "deletedAt": st.sampled_from([None, "", "2026-04-15T00:00:00Z"]),
    },
)


@st.composite
def rows(draw: st.DrawFn, table: str) -> list[ChangeRow]:
    count = draw(st.integers(0, 15))
    return [
        row(
            draw(OPS),
            draw(DATA),
            record=draw(RECORDS),
            user=draw(USERS),
            table=table,
            created=T0 + draw(st.integers(0, 3)) * HOUR,
            stamp=draw(STAMPS),
            event=f"e{i:03d}",
        )
        for i in range(count)
    ]


def recount(store: SnapshotStore) -> int:
    return sum(1 for s in store if store.is_live(s))


@settings(max_examples=200)
@given(st.sampled_from([("mission", MISSIONS_TABLE), ("agent", AGENTS_TABLE)]), st.data())
def test_live_count_and_dirty_set_stay_exact(
    kind_table: tuple[Kind, str], data: st.DataObject
) -> None:
    kind, table = kind_table
    store = SnapshotStore(kind)
    expected: dict[tuple[str, str], None] = {}  # the keys changed since the last take, in order
    for r in data.draw(rows(table)):
        key = (r.user_id, r.record_id)
        before = store.get(*key)
        snapshot = None if before is None else before.copy()
        outcome = store.apply(r)
        after = store.get(*key)
        assert after is not None
        assert outcome.changed == (snapshot != after)
        if outcome.changed:
            expected.setdefault(key)
        assert store.dirty_count() == len(expected)
        if data.draw(st.booleans()):  # the persister takes the dirty states now and then
            taken = store.take_dirty()
            assert [(s.user_id, s.record_id) for s in taken] == list(expected)
            assert all(store.get(s.user_id, s.record_id) is s for s in taken)
            expected.clear()
        assert store.live_count() == recount(store)


def fold_store(kind: Kind, batch: Sequence[ChangeRow]) -> SnapshotStore:
    store = SnapshotStore(kind)
    for r in batch:
        store.apply(r)
    return store


@settings(max_examples=200)
@given(rows(AGENTS_TABLE), st.data())
def test_restore_then_apply_equals_apply_all(batch: list[ChangeRow], data: st.DataObject) -> None:
    split = data.draw(st.integers(0, len(batch)))
    early = fold_store("agent", batch[:split])
    store = SnapshotStore("agent")
    # Some rows arrive before the load finishes; the rest after.
    before_load = data.draw(st.integers(split, len(batch)))
    for r in batch[split:before_load]:
        store.apply(r)
    store.restore(persisted(s) for s in early)
    for r in batch[before_load:]:
        store.apply(r)
    expected = fold_store("agent", batch)
    assert {(s.user_id, s.record_id): s for s in store} == {
        (s.user_id, s.record_id): s for s in expected
    }
    assert store.live_count() == expected.live_count() == recount(store)


def test_apply_sets_bookkeeping_only_on_change() -> None:
    store = SnapshotStore("mission")
    r = row("insert", {"title": "x"})
    assert store.apply(r, Lsn(10), 5).changed
    state = store.get("u1", "m1")
    assert state is not None and (state.last_lsn, state.last_applied_us) == (Lsn(10), 5)
    assert not store.apply(r, Lsn(20), 6).changed  # a replay: still the first transaction's
    assert (state.last_lsn, state.last_applied_us) == (Lsn(10), 5)
    store.apply(row("update", {"title": "y"}, stamp="2026-04-15T01:00:00Z"))
    assert (state.last_lsn, state.last_applied_us) == (Lsn(10), 5)  # no LSN given
