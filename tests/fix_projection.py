"""Test helpers for the projections: `sync_changes` as pgoutput describes it, row values,
transactions, projectors, and comparable views of stores and outcomes."""

from __future__ import annotations

import orjson

from core.lsn import Lsn
from projections.decode import column_indexes
from projections.merge import RecordState
from projections.projector import Outcome, Projector
from projections.stores import SnapshotStore
from stream.pgoutput import Column, Relation, TupleData
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


def projector(compiled: bool = True) -> Projector:
    return Projector(
        missions=SnapshotStore("mission"), agents=SnapshotStore("agent"), compiled=compiled
    )


def state_of(s: RecordState) -> tuple[object, ...]:
    return (
        s.user_id,
        s.record_id,
        s.exists,
        s.deleted,
        s.values,
        list(s.values),  # field order too: serialisation follows it
        s.keys,
        s.last_lsn,
        s.last_applied_us,
    )


def store_of(store: SnapshotStore) -> tuple[object, ...]:
    """Everything a store holds; takes its dirty states."""
    return (
        sorted(state_of(s) for s in store),  # type: ignore[type-var]
        store.live_count(),
        [(s.user_id, s.record_id) for s in store.take_dirty()],
    )


def outcome_of(o: Outcome) -> tuple[object, ...]:
    return (
        o.mission_rows,
        o.agent_rows,
        o.foreign_rows,
        o.invalid_stamps,
        o.new_records,
        o.changed_missions,
        o.changed_agents,
        [(d.lsn, d.event_id, d.reason, d.raw) for d in o.dead_letters],
    )
