"""The transaction assembler on captured streams (protocols 1 and 2), on protocol
violations, and on generated interleavings of streamed and plain transactions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.lsn import Lsn
from stream.errors import DecodeError
from stream.frames import XLogData, parse_frame
from stream.pgoutput import (
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputDecoder,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
)
from stream.transactions import CommittedTransaction, RowInsert, TransactionAssembler
from tests.data.capture_pgoutput import load_capture

LSN = Lsn(0x2_0000_0000)


@dataclass(frozen=True)
class Step:
    message: PgOutputMessage
    output: CommittedTransaction | LogicalMessage | None
    in_transaction: bool
    buffered_rows: int


def assemble(proto: int) -> list[Step]:
    decoder = PgOutputDecoder(proto)
    assembler = TransactionAssembler()
    steps = []
    for captured in load_capture(proto):
        frame = parse_frame(captured.frame)
        if type(frame) is XLogData:
            message = decoder.decode(frame.payload, frame.wal_start)
            output = assembler.feed(message, frame.wal_start)
            steps.append(Step(message, output, assembler.in_transaction, assembler.buffered_rows))
    return steps


STEPS = {proto: assemble(proto) for proto in (1, 2)}


def outputs(proto: int) -> list[CommittedTransaction | LogicalMessage]:
    return [s.output for s in STEPS[proto] if s.output is not None]


def summary(out: CommittedTransaction | LogicalMessage) -> tuple[object, ...]:
    if isinstance(out, LogicalMessage):
        return ("message", out.content)
    return (
        len(out.inserts),
        tuple(type(c).__name__ for c in out.other_changes),
        tuple(m.content for m in out.messages),
        out.origin,
        out.streamed,
    )


def first_int(row: RowInsert) -> int:
    value = row[1][0]
    assert isinstance(value, bytes)
    return int(value)


PLAIN_WORKLOAD = [
    (1, (), (), None, False),  # items 1 (with Type + Relation)
    (3, (), (), None, False),  # three sync_changes rows
    (0, ("Update",), (), None, False),
    (0, ("Update",), (), None, False),  # key change
    (2, ("Update", "Delete"), (), None, False),  # REPLICA IDENTITY FULL
    (0, ("Delete",), (), None, False),
    (1, (), (), None, False),  # docs (TOASTed body)
    (0, ("Update",), (), None, False),  # body unchanged
    (1, (), (b"hello",), None, False),
    ("message", b"\x00\xff\x01"),  # non-transactional: at once
    ("message", b"ping"),
    (0, (), (b"alone",), None, False),
    (1, (), (), "capture_origin", False),
    (1, (), (), None, False),  # after ALTER TABLE
    (0, ("Truncate",), (), None, False),
    (0, ("Truncate",), (), None, False),
]


def test_protocol_1_transactions() -> None:
    assert [summary(o) for o in outputs(1)] == PLAIN_WORKLOAD


def test_protocol_2_transactions() -> None:
    got = [summary(o) for o in outputs(2)]
    assert got[: len(PLAIN_WORKLOAD)] == PLAIN_WORKLOAD
    kiwi, committed, rolled_back_savepoint = outputs(2)[len(PLAIN_WORKLOAD) :]
    # A plain transaction that committed while the big one was streaming comes first.
    assert summary(kiwi) == (1, (), (), None, False)
    assert isinstance(committed, CommittedTransaction)
    ids = [first_int(row) for row in committed.inserts]
    streamed_rows = len(ids) - 2
    assert streamed_rows > 30
    assert ids == [*range(1, streamed_rows + 1), 1000001, 1000002]
    assert summary(committed)[1:] == (("Update", "Delete", "Truncate"), (b"in-stream",), None, True)
    # The aborted streamed transaction yields nothing; the one with a rolled-back savepoint
    # keeps exactly the rows outside that savepoint.
    assert isinstance(rolled_back_savepoint, CommittedTransaction)
    assert [values for _, values in rolled_back_savepoint.inserts] == [
        (str(i).encode(),) for i in (3000001, 3000002, 3000003, 3000011, 3000012, 3000013)
    ] + [(str(i).encode(),) for i in (3000021, 3000022, 3000023)]
    assert rolled_back_savepoint.origin == "capture_origin" and rolled_back_savepoint.streamed


@pytest.mark.parametrize("proto", [1, 2])
def test_commit_positions(proto: int) -> None:
    txns = [o for o in outputs(proto) if isinstance(o, CommittedTransaction)]
    assert all(t.commit_lsn < t.end_lsn for t in txns)
    ends = [t.end_lsn for t in txns]
    assert ends == sorted(ends) and len(set(ends)) == len(ends)
    assert all(type(t.commit_lsn) is Lsn and type(t.end_lsn) is Lsn for t in txns)
    assert not STEPS[proto][-1].in_transaction and STEPS[proto][-1].buffered_rows == 0


def test_rows_carry_the_relation_as_it_was() -> None:
    txns = [o for o in outputs(1) if isinstance(o, CommittedTransaction) and o.inserts]
    (first, _), (late, late_values) = txns[0].inserts[0], txns[-1].inserts[0]
    assert first.name == late.name == "items"
    assert len(first.columns) == 4 and len(late.columns) == 5
    assert late_values[late.column_index("note")] == b"late column"


def test_in_transaction_while_a_streamed_transaction_is_pending() -> None:
    steps = STEPS[2]
    first_stop = next(i for i, s in enumerate(steps) if type(s.message) is StreamStop)
    assert steps[first_stop].in_transaction and steps[first_stop].buffered_rows > 30
    kiwi = next(
        s for s in steps[first_stop:] if isinstance(s.output, CommittedTransaction)
    )  # the plain transaction committed between the blocks
    assert kiwi.in_transaction and kiwi.buffered_rows == steps[first_stop].buffered_rows
    aborts = [s for s in steps if type(s.message) is StreamAbort]
    assert aborts[0].buffered_rows < steps[steps.index(aborts[0]) - 1].buffered_rows


# --- synthetic messages -------------------------------------------------------------

REL = Relation(None, 1, "public", "t", "d", (Column(1, "id", 23, -1),))


def row(i: int, xid: int | None = None) -> Insert:
    return Insert(xid, 1, (str(i).encode(),))


def feed_all(messages: list[PgOutputMessage]) -> list[CommittedTransaction | LogicalMessage]:
    assembler = TransactionAssembler()
    out = [assembler.feed(m, LSN) for m in messages]
    return [o for o in out if o is not None]


BEGIN = Begin(Lsn(100), 5, 9)
COMMIT = Commit(0, Lsn(100), Lsn(120), 5)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([REL, BEGIN, BEGIN], "Begin inside"),
        ([REL, COMMIT], "Commit without Begin"),
        ([REL, row(1)], "outside a transaction"),
        ([BEGIN, row(1)], "no Relation message"),
        ([BEGIN, Update(None, 2, None, None, (b"1",))], "no Relation message"),
        ([BEGIN, Delete(None, 2, "K", (b"1",))], "no Relation message"),
        ([BEGIN, Truncate(None, 0, (1,))], "no Relation message"),
        ([REL, BEGIN, Commit(0, Lsn(101), Lsn(120), 5)], "differs from Begin"),
        ([Origin(Lsn(0), "o")], "Origin outside"),
        ([LogicalMessage(None, True, Lsn(5), "p", b"")], "outside a transaction"),
        ([BEGIN, LogicalMessage(None, False, Lsn(5), "p", b"")], "inside a transaction"),
        ([StreamStart(7, False)], "first segment never came"),
        ([StreamStart(7, True), StreamStop(), StreamStart(7, True)], "already buffered"),
        ([StreamStart(7, True), StreamStart(8, True)], "inside a transaction or block"),
        ([BEGIN, StreamStart(7, True)], "inside a transaction or block"),
        ([StreamStart(7, True), BEGIN], "Begin inside"),
        ([StreamStop()], "without Stream Start"),
        ([StreamCommit(7, 0, Lsn(1), Lsn(2), 0)], "never streamed"),
        ([StreamStart(7, True), StreamCommit(7, 0, Lsn(1), Lsn(2), 0)], "inside"),
        ([StreamStart(7, True), StreamAbort(7, 7)], "inside"),
        ([REL, StreamStart(7, True), row(1)], "without an xid"),
    ],
)
def test_protocol_violations(messages: list[PgOutputMessage], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        feed_all(messages)
    assert info.value.lsn == LSN


def test_a_plain_transaction() -> None:
    (txn,) = feed_all(
        [
            BEGIN,
            REL,
            Type(None, 77, "public", "mood"),
            row(1),
            Origin(Lsn(3), "elsewhere"),
            Update(None, 1, None, None, (b"2",)),
            LogicalMessage(None, True, Lsn(110), "p", b"x"),
            row(2),
            COMMIT,
        ]
    )
    assert txn == CommittedTransaction(
        xid=9,
        commit_lsn=Lsn(100),
        end_lsn=Lsn(120),
        commit_time_us=5,
        inserts=[(REL, (b"1",)), (REL, (b"2",))],
        other_changes=[Update(None, 1, None, None, (b"2",))],
        messages=[LogicalMessage(None, True, Lsn(110), "p", b"x")],
        origin="elsewhere",
        streamed=False,
    )


def test_stream_abort_of_an_unknown_transaction_discards_nothing() -> None:
    assembler = TransactionAssembler()
    assert assembler.feed(StreamAbort(5, 6), LSN) is None
    assert assembler.feed(StreamAbort(5, 5), LSN) is None
    assert not assembler.in_transaction


def test_relations_and_types_are_kept() -> None:
    assembler = TransactionAssembler()
    newer = Relation(None, 1, "public", "t", "d", (*REL.columns, Column(0, "x", 25, -1)))
    for message in (REL, Type(None, 77, "public", "mood"), newer):
        assert assembler.feed(message, LSN) is None
    assert dict(assembler.relations) == {1: newer}
    assert assembler.types[77].name == "mood"
    assert not assembler.in_transaction


# --- generated interleavings --------------------------------------------------------

TOP = 100
SUBS = (101, 102, 103)


@st.composite
def streamed_scripts(draw: st.DrawFn) -> tuple[list[PgOutputMessage], list[object]]:
    """A streamed transaction in several blocks, some subtransactions aborted between
    blocks, plain transactions in between, then a commit or an abort; and the expected
    outputs, as summaries."""
    messages: list[PgOutputMessage] = [REL]
    expected: list[object] = []
    kept: list[int] = []
    live = [TOP, *SUBS]
    next_id = iter(range(1, 10_000))
    for block in range(draw(st.integers(1, 4))):
        messages.append(StreamStart(TOP, block == 0))
        pending: list[tuple[int, int]] = []
        for _ in range(draw(st.integers(0, 6))):
            xid, i = draw(st.sampled_from(live)), next(next_id)
            messages.append(row(i, xid))
            pending.append((xid, i))
        messages.append(StreamStop())
        kept.extend(i for _, i in pending)
        for sub in draw(st.lists(st.sampled_from(SUBS), max_size=2, unique=True)):
            messages.append(StreamAbort(TOP, sub))
            if sub in live:
                live.remove(sub)
            kept = [i for i in kept if not _made_by(messages, i, sub)]
        if draw(st.booleans()):
            plain = next(next_id)
            lsn = Lsn(1000 + plain)
            messages += [Begin(lsn, 0, 50 + plain), row(plain), Commit(0, lsn, Lsn(lsn + 1), 0)]
            expected.append((False, [plain]))
    if draw(st.booleans()):
        messages.append(StreamCommit(TOP, 0, Lsn(5000), Lsn(5001), 0))
        expected.append((True, kept))
    else:
        messages.append(StreamAbort(TOP, TOP))
    return messages, expected


def _made_by(messages: list[PgOutputMessage], i: int, xid: int) -> bool:
    return any(type(m) is Insert and m.new == (str(i).encode(),) and m.xid == xid for m in messages)


@given(streamed_scripts())
def test_streamed_transactions_against_a_model(
    script: tuple[list[PgOutputMessage], list[object]],
) -> None:
    messages, expected = script
    assembler = TransactionAssembler()
    got = []
    for message in messages:
        out = assembler.feed(message, LSN)
        if isinstance(out, CommittedTransaction):
            ids = [first_int(r) for r in out.inserts]
            got.append((out.streamed, ids))
        rows_pending = assembler.buffered_rows
        assert rows_pending >= 0
    assert got == expected
    assert not assembler.in_transaction and assembler.buffered_rows == 0


# --- the hot path -------------------------------------------------------------------


def test_add_insert_buffers_like_feed() -> None:
    fed, added = TransactionAssembler(), TransactionAssembler()
    for assembler in (fed, added):
        assembler.feed(REL, LSN)
        assembler.feed(BEGIN, LSN)
    fed.feed(row(1), LSN)
    assert added.add_insert(1, (b"1",))
    assert added.buffered_rows == fed.buffered_rows == 1
    assert added.feed(COMMIT, LSN) == fed.feed(COMMIT, LSN)


def test_add_insert_declines_what_feed_must_reject() -> None:
    assembler = TransactionAssembler()
    assembler.feed(REL, LSN)
    assert not assembler.add_insert(1, (b"1",))  # no transaction open
    assert not assembler.in_transaction and assembler.buffered_rows == 0
    assembler.feed(BEGIN, LSN)
    assert not assembler.add_insert(2, (b"1",))  # relation never described
    assert assembler.buffered_rows == 0
    (txn,) = [out for out in [assembler.feed(COMMIT, LSN)] if out is not None]
    assert isinstance(txn, CommittedTransaction) and txn.inserts == []
    assembler.feed(StreamStart(7, True), LSN)
    assert not assembler.add_insert(1, (b"1",))  # a stream block is not a plain transaction
    assert assembler.buffered_rows == 0
