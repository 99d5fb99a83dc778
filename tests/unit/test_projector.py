"""The projector on hand-built transactions: routing, counting, dead letters, bookkeeping,
skipping what was applied, and agreement with decoding and merging row by row."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from core.lsn import Lsn
from core.sync_changes import COLUMNS
from projections.decode import column_indexes, decode_row
from projections.projector import Outcome, Projector
from projections.rows import ChangeRow
from projections.stores import SnapshotStore
from stream.pgoutput import UNCHANGED, Column, Relation, TupleData
from stream.transactions import CommittedTransaction, RowInsert

# sync_changes as pgoutput describes it, columns in table order.
NAMES = (
    "id",
    "app_id",
    "table_name",
    "record_id",
    "user_id",
    "op",
    "data",
    "field_meta",
    "client_id",
    "created_at",
    "schema_version",
    "actor",
    "origin",
    "space_id",
)
SYNC = Relation(
    None, 16400, "public", "sync_changes", "d", tuple(Column(0, n, 25, -1) for n in NAMES)
)
ITEMS = Relation(None, 16500, "public", "items", "d", (Column(1, "id", 23, -1),))
_IDX = column_indexes(NAMES)
assert _IDX is not None
IDX: tuple[int, ...] = _IDX
CREATED = b"2026-04-15 00:00:00+00"


def values(
    event: int,
    *,
    table: bytes = b"aiMissions",
    app: bytes = b"ai",
    record: bytes = b"m1",
    op: bytes = b"update",
    data: object = None,
    stamp: str = "2026-04-15T01:00:00Z",
) -> TupleData:
    body = {"title": f"t{event}"} if data is None else data
    meta = {k: {"at": stamp} for k in body} if isinstance(body, dict) else {}
    return (
        f"ev{event:04d}".encode(),
        app,
        table,
        record,
        b"u1",
        op,
        orjson.dumps(body),
        orjson.dumps(meta),
        b"web",
        CREATED,
        b"1",
        None,
        None,
        None,
    )


def tx(rows: list[RowInsert], commit: int = 100) -> CommittedTransaction:
    return CommittedTransaction(
        xid=1,
        commit_lsn=Lsn(commit),
        end_lsn=Lsn(commit + 10),
        commit_time_us=7,
        inserts=rows,
        other_changes=[],
        messages=[],
        origin=None,
        streamed=False,
    )


def projector() -> Projector:
    return Projector(missions=SnapshotStore("mission"), agents=SnapshotStore("agent"))


def test_a_transaction_of_every_kind_of_row() -> None:
    p = projector()
    out = p.apply_transaction(
        tx(
            [
                RowInsert(SYNC, values(1, op=b"insert")),
                RowInsert(ITEMS, (b"1",)),  # another table of the publication
                RowInsert(SYNC, values(2, app=b"notes")),  # another app
                RowInsert(SYNC, values(3, table=b"agents", record=b"a1")),
                RowInsert(SYNC, values(4, data=[1])),  # data not an object: dead letter
                RowInsert(SYNC, values(5, stamp="yesterday")),  # invalid stamp, applied
                RowInsert(SYNC, values(6, record=b"m2")),
                RowInsert(SYNC, values(1, op=b"insert")),  # a replay changes nothing
            ]
        )
    )
    assert out is not None
    assert (out.mission_rows, out.agent_rows, out.foreign_rows) == (4, 1, 2)
    assert (out.invalid_stamps, out.new_records) == (1, 3)
    assert out.changed_missions == [("u1", "m1"), ("u1", "m2")]  # ev5 lost to ev1
    assert out.changed_agents == [("u1", "a1")]
    (dead,) = out.dead_letters
    assert (dead.lsn, dead.event_id, dead.reason) == (Lsn(100), "ev0004", "data-not-object")
    columns = dead.raw["columns"]
    assert isinstance(columns, dict) and columns["data"] == "[1]"
    state = p.missions.get("u1", "m1")
    assert state is not None and state.values == {"title": "t1"}
    assert (state.last_lsn, state.last_applied_us) == (Lsn(100), 7)
    assert (p.applied_lsn, p.applied_commit_time_us) == (Lsn(110), 7)
    assert p.apply_transaction(tx([RowInsert(SYNC, values(9))], commit=105)) is None
    assert p.apply_transaction(tx([], commit=110)) is not None  # starts at the end: new


def test_a_relation_without_the_columns_we_read_is_foreign() -> None:
    narrow = Relation(None, 16400, "public", "sync_changes", "d", SYNC.columns[:5])
    out = projector().apply_transaction(tx([RowInsert(narrow, values(1)[:5])]))
    assert out is not None and out.foreign_rows == 1 and out.rows == 0


def test_a_changed_relation_is_read_with_its_new_layout() -> None:
    moved = Relation(None, 16400, "public", "sync_changes", "d", SYNC.columns[::-1])
    p = projector()
    p.apply_transaction(tx([RowInsert(SYNC, values(1)), RowInsert(moved, values(2)[::-1])]))
    state = p.missions.get("u1", "m1")
    assert state is not None and state.values == {"title": "t2"}


def _row(event: int, record: bytes, op: bytes, title: str, stamp: str, toast: bool) -> TupleData:
    if toast:
        return (*values(event)[:6], UNCHANGED, *values(event)[7:])
    return values(event, record=record, op=op, data={"title": title}, stamp=stamp)


ROW = st.builds(
    _row,
    st.integers(0, 50),
    st.sampled_from([b"m1", b"m2"]),
    st.sampled_from([b"insert", b"update", b"delete"]),
    st.text(max_size=3),
    st.sampled_from(["2026-04-15T01:00:00Z", "2026-04-15T02:00:00Z", "bad"]),
    st.booleans(),
)


@settings(max_examples=200)
@given(st.lists(ROW, max_size=12))
def test_equals_decoding_and_merging_row_by_row(rows: list[TupleData]) -> None:
    p = projector()
    out = p.apply_transaction(tx([RowInsert(SYNC, r) for r in rows]))
    missions = SnapshotStore("mission")
    expected = Outcome()
    for r in rows:
        row = decode_row(r, IDX)
        if isinstance(row, ChangeRow):
            result = missions.apply(row, Lsn(100), 7)
            expected.mission_rows += 1
            expected.invalid_stamps += result.invalid_stamps
            expected.new_records += result.created
            if result.changed:
                expected.changed_missions.append((row.user_id, row.record_id))
        else:
            expected.dead_letters.append(row)  # type: ignore[arg-type]
    assert out is not None
    assert [d.event_id for d in out.dead_letters] == [d.event_id for d in expected.dead_letters]
    out.dead_letters, expected.dead_letters = [], []
    assert out == expected
    assert sorted(p.missions, key=lambda s: s.record_id) == sorted(
        missions, key=lambda s: s.record_id
    )


def test_loaded_rows_in_columns_order() -> None:
    p = projector()
    out = Outcome()
    loaded = [tuple(v[i] for i in IDX) for v in (values(1), values(2, app=b"x"))]
    p.apply_loaded(loaded, tuple(range(len(COLUMNS))), Lsn(50), 3, out)
    assert (out.mission_rows, out.foreign_rows, out.changed_missions) == (1, 1, [("u1", "m1")])
    state = p.missions.get("u1", "m1")
    assert state is not None and (state.last_lsn, state.last_applied_us) == (Lsn(50), 3)
