"""The projector on hand-built transactions: routing, counting, dead letters, bookkeeping,
skipping what was applied, agreement with decoding and merging row by row, and application
in steps against application whole; with the compiled fold (when built) and without."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.lsn import Lsn
from core.sync_changes import COLUMNS
from projections import fastpath
from projections.decode import decode_row
from projections.projector import Outcome
from projections.rows import ChangeRow
from projections.stores import SnapshotStore
from stream.pgoutput import UNCHANGED, Relation, TupleData
from stream.transactions import RowInsert
from tests.fix_projection import (
    IDX,
    ITEMS,
    SYNC,
    outcome_of,
    projector,
    store_of,
    tx,
    values,
)

PATHS = pytest.mark.parametrize(
    "compiled",
    [
        pytest.param(
            True,
            id="compiled",
            marks=pytest.mark.skipif(
                fastpath.compiled_fold() is None, reason="projections._speedups is not built"
            ),
        ),
        pytest.param(False, id="python"),
    ],
)


@PATHS
def test_a_transaction_of_every_kind_of_row(compiled: bool) -> None:
    p = projector(compiled)
    out = p.apply_transaction(
        tx(
            [
                (SYNC, values(1, op=b"insert")),
                (ITEMS, (b"1",)),  # another table of the publication
                (SYNC, values(2, app=b"notes")),  # another app
                (SYNC, values(3, table=b"agents", record=b"a1")),
                (SYNC, values(4, data=[1])),  # data not an object: dead letter
                (SYNC, values(5, stamp="yesterday")),  # invalid stamp, applied
                (SYNC, values(6, record=b"m2")),
                (SYNC, values(1, op=b"insert")),  # a replay changes nothing
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
    assert p.apply_transaction(tx([(SYNC, values(9))], commit=105)) is None
    assert p.apply_transaction(tx([], commit=110)) is not None  # starts at the end: new


@PATHS
def test_a_relation_without_the_columns_we_read_is_foreign(compiled: bool) -> None:
    narrow = Relation(None, 16400, "public", "sync_changes", "d", SYNC.columns[:5])
    out = projector(compiled).apply_transaction(tx([(narrow, values(1)[:5])]))
    assert out is not None and out.foreign_rows == 1 and out.rows == 0


@PATHS
def test_a_changed_relation_is_read_with_its_new_layout(compiled: bool) -> None:
    moved = Relation(None, 16400, "public", "sync_changes", "d", SYNC.columns[::-1])
    p = projector(compiled)
    p.apply_transaction(tx([(SYNC, values(1)), (moved, values(2)[::-1])]))
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


@PATHS
@settings(max_examples=200, deadline=None)
@given(st.lists(ROW, max_size=12))
def test_equals_decoding_and_merging_row_by_row(compiled: bool, rows: list[TupleData]) -> None:
    p = projector(compiled)
    out = p.apply_transaction(tx([(SYNC, r) for r in rows]))
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


@PATHS
def test_loaded_rows_in_columns_order(compiled: bool) -> None:
    p = projector(compiled)
    out = Outcome()
    loaded = [tuple(v[i] for i in IDX) for v in (values(1), values(2, app=b"x"))]
    p.apply_loaded(loaded, tuple(range(len(COLUMNS))), Lsn(50), 3, out)
    assert (out.mission_rows, out.foreign_rows, out.changed_missions) == (1, 1, [("u1", "m1")])
    state = p.missions.get("u1", "m1")
    assert state is not None and (state.last_lsn, state.last_applied_us) == (Lsn(50), 3)


# --- application in steps ----------------------------------------------------------------

INSERTED = st.one_of(
    ROW.map(lambda r: (SYNC, r)),
    st.builds(
        lambda event, op: (SYNC, values(event, table=b"agents", record=b"a1", op=op)),
        st.integers(0, 50),
        st.sampled_from([b"insert", b"update", b"delete"]),
    ),
    st.just((ITEMS, (b"1",))),  # another table of the publication
    st.just((SYNC, values(99, data=[1]))),  # a dead letter
)


@PATHS
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(INSERTED, max_size=25), min_size=1, max_size=4),
    st.lists(st.integers(1, 6), min_size=1, max_size=5),
)
def test_applying_in_steps_equals_applying_whole(
    compiled: bool, transactions: list[list[RowInsert]], steps: list[int]
) -> None:
    whole, stepped = projector(compiled), projector(compiled)
    for n, rows in enumerate(transactions):
        t = tx(rows, commit=100 * (n + 1))
        expected = whole.apply_transaction(t)
        assert expected is not None
        before = (stepped.applied_lsn, stepped.applied_commit_time_us)
        applying = stepped.start(t)
        assert applying is not None
        taken = 0
        for i in range(len(rows) + 1):
            size = steps[i % len(steps)]
            done = applying.step(size)
            taken = min(len(rows), taken + size)
            assert applying.rows_left == len(rows) - taken
            assert done == (taken == len(rows)) == applying.done
            if done:
                break
            # The position stays before the transaction until its last step.
            assert (stepped.applied_lsn, stepped.applied_commit_time_us) == before
            with pytest.raises(RuntimeError):
                stepped.start(t)
        assert done and applying.step(1)  # a finished one stays finished
        assert outcome_of(applying.outcome) == outcome_of(expected)
        assert (stepped.applied_lsn, stepped.applied_commit_time_us) == (t.end_lsn, 7)
        assert stepped.start(t) is None and stepped.apply_transaction(t) is None
        assert store_of(stepped.missions) == store_of(whole.missions)
        assert store_of(stepped.agents) == store_of(whole.agents)


@PATHS
def test_a_transaction_in_steps_keeps_the_position_until_its_last_step(compiled: bool) -> None:
    p = projector(compiled)
    rows = [(SYNC, values(i, record=f"m{i}".encode(), op=b"insert")) for i in range(5)]
    applying = p.start(tx(rows, commit=100))
    assert applying is not None and p.applied_lsn == Lsn(0)
    assert not applying.step(2) and len(p.missions) == 2
    assert applying.outcome.changed_missions == [("u1", "m0"), ("u1", "m1")]
    with pytest.raises(RuntimeError):
        p.advance(Lsn(500))
    with pytest.raises(ValueError):
        applying.step(0)
    assert not applying.step(2) and applying.step(2)
    assert (p.applied_lsn, len(p.missions), applying.outcome.new_records) == (Lsn(110), 5, 5)
    empty = p.start(tx([], commit=110))
    assert empty is not None and empty.rows_left == 0 and empty.step(1)
    assert empty.outcome == Outcome() and p.applied_lsn == Lsn(120)
