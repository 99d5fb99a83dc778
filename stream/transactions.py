"""Assembles decoded pgoutput messages into committed transactions (sans-IO).

pgoutput sends a plain transaction whole, when it commits: Begin, its changes, Commit.
With protocol 2 and `streaming 'on'` a large transaction arrives early instead, in
blocks (Stream Start ... Stream Stop) interleaved with other transactions, and is settled
later by Stream Commit or Stream Abort; an abort may name a subtransaction, whose changes
alone are then discarded. `TransactionAssembler.feed` takes the messages in stream order
and hands back, at each commit, one `CommittedTransaction` holding everything that
transaction did, so consumers never see a change that might still be rolled back.

Invariants the consumer relies on:
- A `CommittedTransaction` is returned exactly at its Commit / Stream Commit message and
  contains only changes of committed (sub)transactions, in WAL order.
- `in_transaction` is False only when nothing received is waiting for a commit decision;
  only then may the consumer confirm a keepalive's WAL end to the slot.
- Relation messages take effect at once, even inside a stream block whose transaction
  later aborts: each row keeps the Relation that preceded it, and the server sends a
  Relation again before any change whose shape differs from what it last sent.
- Inside a stream block each change carries the xid of the (sub)transaction that made it
  (observed on PostgreSQL 18, see tests/unit/test_pgoutput.py); Stream Abort with
  `subxid != xid` drops exactly the changes carrying `subxid`. The server sends one
  Stream Abort per aborted subtransaction (seen: a top-level abort first names its
  released subtransaction, then itself), so nested savepoints need nothing more.
- Protocol violations (Begin inside a transaction, Commit without Begin, a change outside
  a transaction, a change for a relation never described, a Commit whose LSN differs from
  its Begin's) raise `DecodeError` and leave the assembler unusable for that connection:
  reconnect and start over from the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

from core.lsn import Lsn
from stream.errors import DecodeError
from stream.messages import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Unchanged,
    Update,
)

RowInsert: TypeAlias = tuple[Relation, TupleData]
"""An inserted row: `(relation, values)`, the relation as last described before the row.
A plain tuple, so the compiled frame loop builds it with one call and the projections read it
without knowing this module (their `projections.projector.InsertedRow` is its shape)."""


@dataclass(frozen=True, slots=True)
class CommittedTransaction:
    """Everything one committed transaction did that the publication sends.

    `commit_lsn` is where the commit record starts, `end_lsn` where it ends: the position
    to persist as the checkpoint once this transaction's effects are durable. `streamed`
    tells that it arrived in stream blocks before it committed (protocol 2).
    """

    xid: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time_us: int
    inserts: list[RowInsert]
    other_changes: list[Update | Delete | Truncate]
    messages: list[LogicalMessage]
    origin: str | None
    streamed: bool


_Buffered: TypeAlias = RowInsert | Update | Delete | Truncate | LogicalMessage


class _OpenTransaction:
    """The plain (non-streamed) transaction between its Begin and Commit."""

    __slots__ = ("begin", "inserts", "messages", "origin", "other_changes", "rows")

    def __init__(self, begin: Begin) -> None:
        self.begin = begin
        self.inserts: list[RowInsert] = []
        self.other_changes: list[Update | Delete | Truncate] = []
        self.messages: list[LogicalMessage] = []
        self.origin: str | None = None
        self.rows = 0


class _StreamedTransaction:
    """A streamed transaction's changes so far, each tagged with the xid of the
    (sub)transaction that made it, so a subtransaction abort can drop exactly its own."""

    __slots__ = ("entries", "origin", "rows")

    def __init__(self) -> None:
        self.entries: list[tuple[int, _Buffered]] = []
        self.origin: str | None = None
        self.rows = 0


class TransactionAssembler:
    """Feeds on the messages of one replication connection, in order."""

    __slots__ = (
        "_block",
        "_buffered_rows",
        "_open",
        "_pump",
        "_relations",
        "_streamed",
        "_types",
    )

    def __init__(self, *, compiled: bool = True) -> None:
        """`compiled`: take runs of plain Insert frames with the compiled `stream._tuples.pump`
        when it is built (see `add_insert_frames`); False, or a build without it, leaves
        `add_insert_frames` unavailable (`pumps` is False) and every frame to `feed`."""
        self._pump: _Pump | None = _compiled_pump() if compiled else None
        self._relations: dict[int, Relation] = {}
        self._types: dict[int, Type] = {}
        self._open: _OpenTransaction | None = None
        self._streamed: dict[int, _StreamedTransaction] = {}  # top-level xid -> buffer
        self._block: tuple[int, _StreamedTransaction] | None = None  # open stream block
        self._buffered_rows = 0

    @property
    def in_transaction(self) -> bool:
        """A plain transaction is open, or some streamed transaction awaits its outcome."""
        return self._open is not None or bool(self._streamed)

    @property
    def buffered_rows(self) -> int:
        """Inserted, updated and deleted rows held for transactions not yet committed."""
        return self._buffered_rows

    @property
    def pumps(self) -> bool:
        """`add_insert_frames` can take frames: the compiled pump is built and in use."""
        return self._pump is not None

    @property
    def relations(self) -> Mapping[int, Relation]:
        """Relation OID -> the latest Relation message for it."""
        return MappingProxyType(self._relations)

    @property
    def types(self) -> Mapping[int, Type]:
        """Type OID -> the latest Type message for it (non-built-in column types)."""
        return MappingProxyType(self._types)

    def feed(self, msg: PgOutputMessage, lsn: Lsn) -> CommittedTransaction | LogicalMessage | None:
        """Take the next message; `lsn` (its frame's WAL start) is for errors only.

        Returns the transaction at its commit, a non-transactional logical message at
        once, and None for everything else.
        """
        if type(msg) is Insert and self.add_insert(msg.relation_oid, msg.new):  # same rules
            return None
        match msg:
            case Insert():
                row = (self._relation(msg.relation_oid, lsn, "I"), msg.new)
                self._add(row, msg.xid, lsn, "I")
            case Update() | Delete():
                tag = "U" if type(msg) is Update else "D"
                self._relation(msg.relation_oid, lsn, tag)
                self._add(msg, msg.xid, lsn, tag)
            case Begin():
                if self._open is not None or self._block is not None:
                    raise DecodeError("Begin inside an open transaction", lsn=lsn, tag="B")
                self._open = _OpenTransaction(msg)
            case Commit():
                return self._commit(msg, lsn)
            case Relation():
                self._relations[msg.oid] = msg
            case Type():
                self._types[msg.oid] = msg
            case Truncate():
                for oid in msg.relation_oids:
                    self._relation(oid, lsn, "T")
                self._add(msg, msg.xid, lsn, "T")
            case LogicalMessage():
                if msg.transactional:
                    self._add(msg, msg.xid, lsn, "M")
                elif self._open is not None or self._block is not None:
                    raise DecodeError(
                        "non-transactional message inside a transaction", lsn=lsn, tag="M"
                    )
                else:
                    return msg
            case Origin():
                if self._block is not None:
                    self._block[1].origin = msg.name
                elif self._open is not None:
                    self._open.origin = msg.name
                else:
                    raise DecodeError("Origin outside a transaction", lsn=lsn, tag="O")
            case StreamStart():
                self._stream_start(msg, lsn)
            case StreamStop():
                if self._block is None:
                    raise DecodeError("Stream Stop without Stream Start", lsn=lsn, tag="E")
                self._block = None
            case StreamCommit():
                return self._stream_commit(msg, lsn)
            case StreamAbort():
                self._stream_abort(msg, lsn)
        return None

    def add_insert(self, relation_oid: int, new: TupleData) -> bool:
        """The hot path of `feed(Insert(None, relation_oid, new), lsn)`: buffer the row in
        the open plain transaction. Returns False, having done nothing, when `feed` must
        take the message instead: no plain transaction is open (a change of a streamed
        transaction, or a change outside any, which `feed` rejects), or the relation was
        never described (which `feed` rejects)."""
        open_txn = self._open
        if open_txn is None:
            return False
        relation = self._relations.get(relation_oid)
        if relation is None:
            return False
        open_txn.inserts.append((relation, new))
        open_txn.rows += 1
        self._buffered_rows += 1
        return True

    def add_insert_frames(
        self, get_copy_data: GetCopyData, limit: int, *, takes_inserts: bool
    ) -> tuple[int, int, int, bytes | int | None]:
        """Read frames with `get_copy_data` and buffer, up to `limit` of them, each XLogData
        frame carrying a plain Insert that `add_insert` would take (the message read as
        `PgOutputDecoder.plain_insert` reads it), with the compiled `stream._tuples.pump`;
        only when `pumps`. `takes_inserts` False (a stream block is open) takes none. Returns
        the frames taken, their bytes, their highest WAL end (0 if none) and the rest: the
        first frame not taken (for the general path), get_copy_data's size when it had no
        frame (<= 0), or None after `limit` frames."""
        pump = self._pump
        if pump is None:
            raise RuntimeError("add_insert_frames needs the compiled pump (see `pumps`)")
        open_txn = self._open
        inserts = open_txn.inserts if open_txn is not None and takes_inserts else None
        taken, taken_bytes, end, rest = pump(
            get_copy_data, limit, UNCHANGED, self._relations, inserts
        )
        if taken:
            assert open_txn is not None
            open_txn.rows += taken
            self._buffered_rows += taken
        return taken, taken_bytes, end, rest

    def _relation(self, oid: int, lsn: Lsn, tag: str) -> Relation:
        relation = self._relations.get(oid)
        if relation is None:
            raise DecodeError(
                f"change for relation OID {oid}, which no Relation message described",
                lsn=lsn,
                tag=tag,
            )
        return relation

    def _add(self, change: _Buffered, xid: int | None, lsn: Lsn, tag: str) -> None:
        """Buffer a change in the open transaction or the current stream block."""
        is_row = tag in "IUD"
        if self._open is not None:
            open_txn = self._open
            if isinstance(change, tuple):
                open_txn.inserts.append(change)
            elif isinstance(change, LogicalMessage):
                open_txn.messages.append(change)
            else:
                open_txn.other_changes.append(change)
            open_txn.rows += is_row
        elif self._block is not None:
            if xid is None:
                raise DecodeError("change in a stream block without an xid", lsn=lsn, tag=tag)
            streamed = self._block[1]
            streamed.entries.append((xid, change))
            streamed.rows += is_row
        else:
            raise DecodeError("change outside a transaction", lsn=lsn, tag=tag)
        self._buffered_rows += is_row

    def _commit(self, commit: Commit, lsn: Lsn) -> CommittedTransaction:
        txn = self._open
        if txn is None:
            raise DecodeError("Commit without Begin", lsn=lsn, tag="C")
        if commit.commit_lsn != txn.begin.final_lsn:
            raise DecodeError(
                f"Commit LSN {commit.commit_lsn} differs from Begin's final LSN "
                f"{txn.begin.final_lsn} (xid {txn.begin.xid})",
                lsn=lsn,
                tag="C",
            )
        self._open = None
        self._buffered_rows -= txn.rows
        return CommittedTransaction(
            xid=txn.begin.xid,
            commit_lsn=commit.commit_lsn,
            end_lsn=commit.end_lsn,
            commit_time_us=commit.commit_time_us,
            inserts=txn.inserts,
            other_changes=txn.other_changes,
            messages=txn.messages,
            origin=txn.origin,
            streamed=False,
        )

    def _stream_start(self, msg: StreamStart, lsn: Lsn) -> None:
        if self._open is not None or self._block is not None:
            raise DecodeError("Stream Start inside a transaction or block", lsn=lsn, tag="S")
        streamed = self._streamed.get(msg.xid)
        if msg.first_segment:
            if streamed is not None:
                raise DecodeError(
                    f"first segment of streamed xid {msg.xid}, which is already buffered",
                    lsn=lsn,
                    tag="S",
                )
            streamed = self._streamed[msg.xid] = _StreamedTransaction()
        elif streamed is None:
            raise DecodeError(
                f"continued stream for xid {msg.xid}, whose first segment never came",
                lsn=lsn,
                tag="S",
            )
        self._block = (msg.xid, streamed)

    def _stream_commit(self, msg: StreamCommit, lsn: Lsn) -> CommittedTransaction:
        if self._open is not None or self._block is not None:
            raise DecodeError("Stream Commit inside a transaction or block", lsn=lsn, tag="c")
        streamed = self._streamed.pop(msg.xid, None)
        if streamed is None:
            raise DecodeError(
                f"Stream Commit for xid {msg.xid}, which was never streamed", lsn=lsn, tag="c"
            )
        self._buffered_rows -= streamed.rows
        inserts: list[RowInsert] = []
        other_changes: list[Update | Delete | Truncate] = []
        messages: list[LogicalMessage] = []
        for _, change in streamed.entries:
            if isinstance(change, tuple):
                inserts.append(change)
            elif isinstance(change, LogicalMessage):
                messages.append(change)
            else:
                other_changes.append(change)
        return CommittedTransaction(
            xid=msg.xid,
            commit_lsn=msg.commit_lsn,
            end_lsn=msg.end_lsn,
            commit_time_us=msg.commit_time_us,
            inserts=inserts,
            other_changes=other_changes,
            messages=messages,
            origin=streamed.origin,
            streamed=True,
        )

    def _stream_abort(self, msg: StreamAbort, lsn: Lsn) -> None:
        """Drop the whole transaction, or the changes its aborted subtransaction made.

        An abort for an xid we hold nothing for discards nothing (the server may announce
        aborts of subtransactions whose changes it never sent)."""
        if self._open is not None or self._block is not None:
            raise DecodeError("Stream Abort inside a transaction or block", lsn=lsn, tag="A")
        streamed = self._streamed.get(msg.xid)
        if streamed is None:
            return
        if msg.subxid == msg.xid:
            del self._streamed[msg.xid]
            self._buffered_rows -= streamed.rows
            return
        kept = [entry for entry in streamed.entries if entry[0] != msg.subxid]
        dropped_rows = sum(
            1 for xid, change in streamed.entries if xid == msg.subxid and _is_row(change)
        )
        streamed.entries = kept
        streamed.rows -= dropped_rows
        self._buffered_rows -= dropped_rows


def _is_row(change: _Buffered) -> bool:
    return type(change) is not Truncate and type(change) is not LogicalMessage


GetCopyData: TypeAlias = Callable[[bool], tuple[int, Any]]
"""psycopg's `PGconn.get_copy_data`: `(size, buffer)`; size 0 when no frame is buffered,
-1 at the end of the copy."""
_Pump: TypeAlias = Callable[
    [GetCopyData, int, Unchanged, dict[int, Relation], list[RowInsert] | None],
    tuple[int, int, int, bytes | int | None],
]


def _compiled_pump() -> _Pump | None:
    """`stream._tuples.pump`, or None when the optional module was not built."""
    try:
        from stream._tuples import pump
    except ImportError:
        return None
    return pump
