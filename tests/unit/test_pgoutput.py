"""The pgoutput decoder against frames captured from PostgreSQL 18 (protocols 1 and 2),
hand-made corruptions, and hypothesis-generated garbage and tuples."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.lsn import Lsn
from stream.errors import DecodeError, ProtocolUsageError
from stream.frames import XLogData, parse_frame
from stream.pgoutput import (
    _COMPILED,
    UNCHANGED,
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
    TupleData,
    Type,
    Unchanged,
    Update,
    _compile_columns,
    _plain_insert,
)
from stream.transactions import CommittedTransaction, TransactionAssembler
from tests.data.capture_pgoutput import SYNC_ROWS, load_capture

LSN = Lsn(0x1_0000_0000)


@dataclass(frozen=True)
class Decoded:
    frame: XLogData
    message: PgOutputMessage
    in_stream: bool  # the decoder state the message was decoded in


def decode_capture(proto: int) -> list[Decoded]:
    decoder = PgOutputDecoder(proto)
    out = []
    for captured in load_capture(proto):
        frame = parse_frame(captured.frame)
        if type(frame) is XLogData:
            in_stream = decoder.in_stream_block
            out.append(Decoded(frame, decoder.decode(frame.payload, frame.wal_start), in_stream))
    return out


DECODED = {proto: decode_capture(proto) for proto in (1, 2)}
PLAIN_TYPES = {Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate}
PLAIN_TYPES.add(LogicalMessage)
STREAM_TYPES = {StreamStart, StreamStop, StreamCommit, StreamAbort}


def messages(proto: int, kind: type | None = None) -> list[PgOutputMessage]:
    return [d.message for d in DECODED[proto] if kind is None or type(d.message) is kind]


def test_every_message_type_appears() -> None:
    assert {type(m) for m in messages(1)} == PLAIN_TYPES
    assert {type(m) for m in messages(2)} == PLAIN_TYPES | STREAM_TYPES


@pytest.mark.parametrize("proto", [1, 2])
def test_relations_and_types(proto: int) -> None:
    types = messages(proto, Type)  # sent again with every Relation for `items`
    mood = types[0]
    assert isinstance(mood, Type)
    assert (mood.namespace, mood.name, mood.xid) == ("public", "mood", None)
    assert {(t.oid, t.name) for t in types if isinstance(t, Type)} == {(mood.oid, "mood")}
    relations = [m for m in messages(proto, Relation) if isinstance(m, Relation)]
    items = [r for r in relations if r.name == "items"]
    first = items[0]
    assert first.namespace == "public" and first.replica_identity == "d"
    assert [c.name for c in first.columns] == ["id", "name", "mood", "qty"]
    assert first.key_flags == (True, False, False, False)
    assert first.columns[0] == Column(1, "id", 23, -1)  # int4, no type modifier
    assert first.columns[2].type_oid == mood.oid
    assert first.column_index("qty") == 3
    with pytest.raises(KeyError):
        first.column_index("nope")
    assert [c.name for c in items[-1].columns][-1] == "note"  # after ALTER TABLE ADD COLUMN
    assert {r.oid for r in items} == {first.oid}
    by_name = {r.name: r for r in relations}
    assert by_name["full_ident"].replica_identity == "f"
    assert all(c.is_key for c in by_name["full_ident"].columns)
    sync = by_name["sync_changes"]
    assert len(sync.columns) == 14 and sync.column_index("space_id") == 13
    assert sync.key_flags == (True,) + (False,) * 13
    if proto == 2:
        # The generated column of `bulk` is not published.
        assert [c.name for c in by_name["bulk"].columns] == ["id"]


@pytest.mark.parametrize("proto", [1, 2])
def test_inserted_values(proto: int) -> None:
    inserts = [m for m in messages(proto, Insert) if isinstance(m, Insert)]
    assert inserts[0].new == (b"1", b"apple", b"happy", b"3")
    sync_rows = [i.new for i in inserts if len(i.new) == 14]
    assert len(sync_rows) == len(SYNC_ROWS)
    for got, sent in zip(sync_rows, SYNC_ROWS, strict=True):
        for index in (0, 1, 2, 3, 4, 5, 8, 12, 13):  # plain text columns come back as sent
            value = sent[index]
            assert got[index] == (None if value is None else str(value).encode())
        for index in (6, 7, 11):  # jsonb comes back normalised, with the same meaning
            value = sent[index]
            decoded = got[index]
            assert (decoded is None) == (value is None)
            if isinstance(value, str):
                assert isinstance(decoded, bytes)
                assert json.loads(decoded) == json.loads(value)
        assert got[10] == str(sent[10]).encode()
    unicode_json = sync_rows[1][6]
    assert isinstance(unicode_json, bytes) and "café ✓".encode() in unicode_json
    late = inserts[-1] if proto == 1 else next(i for i in inserts if i.new[0] == b"5")
    assert late.new == (b"5", b"fig", None, None, b"late column")


@pytest.mark.parametrize("proto", [1, 2])
def test_updates_and_deletes(proto: int) -> None:
    updates = [m for m in messages(proto, Update) if isinstance(m, Update)]
    assert (updates[0].old_kind, updates[0].old) == (None, None)  # key unchanged
    assert updates[0].new == (b"1", b"apple", b"happy", b"4")
    assert updates[1].old_kind == "K" and updates[1].old == (b"1", None, None, None)
    assert updates[1].new[0] == b"2"
    assert updates[2].old_kind == "O" and updates[2].old == (b"1", b"a")
    assert updates[2].new == (b"1", b"c")
    toast = updates[3]
    assert toast.new == (b"1", UNCHANGED, b"2") and toast.old is None
    assert isinstance(toast.new[1], Unchanged)
    deletes = [m for m in messages(proto, Delete) if isinstance(m, Delete)]
    assert (deletes[0].old_kind, deletes[0].old) == ("O", (b"2", b"b"))
    assert (deletes[1].old_kind, deletes[1].old) == ("K", (b"2", None, None, None))


@pytest.mark.parametrize("proto", [1, 2])
def test_truncates_messages_and_origin(proto: int) -> None:
    truncates = [m for m in messages(proto, Truncate) if isinstance(m, Truncate)]
    assert truncates[0].options == 3 and truncates[0].cascade and truncates[0].restart_identity
    assert len(truncates[0].relation_oids) == 2
    assert truncates[1].options == 0 and len(truncates[1].relation_oids) == 1
    logical = [m for m in messages(proto, LogicalMessage) if isinstance(m, LogicalMessage)]
    summary = [(m.transactional, m.prefix, m.content) for m in logical[:4]]
    assert summary == [
        (True, "mr", b"hello"),
        (False, "mr-nt", b"\x00\xff\x01"),
        (False, "mr-nt", b"ping"),
        (True, "mr", b"alone"),
    ]
    origin = messages(proto, Origin)[0]
    assert origin == Origin(Lsn.parse("0/ABCDEF0"), "capture_origin")


@pytest.mark.parametrize("proto", [1, 2])
def test_transaction_boundaries_and_lsns(proto: int) -> None:
    begin: Begin | None = None
    ends: list[Lsn] = []
    for d in DECODED[proto]:
        match d.message:
            case Begin() as b:
                assert begin is None
                begin = b
            case Commit() as c:
                assert begin is not None and c.commit_lsn == begin.final_lsn
                assert c.commit_time_us == begin.commit_time_us
                assert c.commit_lsn < c.end_lsn == d.frame.wal_start
                ends.append(c.end_lsn)
                begin = None
            case StreamCommit() as sc:
                assert sc.commit_lsn < sc.end_lsn == d.frame.wal_start
                ends.append(sc.end_lsn)
            case LogicalMessage() as m:
                assert m.lsn == d.frame.wal_start
    assert ends == sorted(set(ends)) and len(ends) > 10
    if proto == 1:  # without streaming, non-zero frame LSNs never go back
        starts = [d.frame.wal_start for d in DECODED[1] if d.frame.wal_start]
        assert starts == sorted(starts)


def test_stream_blocks_carry_xids() -> None:
    for d in DECODED[2]:
        xid = getattr(d.message, "xid", "n/a")
        if type(d.message) in (Relation, Type, Insert, Update, Delete, Truncate):
            assert (xid is not None) is d.in_stream
        if type(d.message) is LogicalMessage:
            assert (xid is not None) is d.in_stream
    starts = [m for m in messages(2, StreamStart) if isinstance(m, StreamStart)]
    assert [s.first_segment for s in starts] == [True, False, True, True, False]
    stream_origin = [d.message for d in DECODED[2] if d.in_stream and type(d.message) is Origin]
    assert stream_origin == [Origin(Lsn(0), "capture_origin")]


def test_subtransaction_changes_carry_the_subtransaction_xid() -> None:
    """In a stream block each change names the (sub)transaction that made it; a Stream
    Abort for a rolled-back savepoint names that subtransaction."""
    top = next(
        d.message.xid
        for d in DECODED[2]
        if type(d.message) is StreamStart and d.message.first_segment and _after_origin(d)
    )
    rows = {
        int(m.new[0]): m.xid
        for m in messages(2, Insert)
        if isinstance(m, Insert) and len(m.new) == 1 and isinstance(m.new[0], bytes)
    }
    rows = {i: x for i, x in rows.items() if i >= 3_000_000}
    assert {rows[i] for i in (3000001, 3000002, 3000003)} == {top}
    keep = rows[3000011]  # SAVEPOINT keep ... RELEASE keep
    drop = rows[3100000]  # SAVEPOINT drop ... ROLLBACK TO drop
    assert drop is not None
    after = rows[3000021]  # ROLLBACK TO keeps the savepoint: a new subtransaction
    assert len({top, keep, drop, after}) == 4
    aborts = [m for m in messages(2, StreamAbort) if isinstance(m, StreamAbort) and m.xid == top]
    assert aborts == [StreamAbort(top, drop)]
    assert {x for i, x in rows.items() if i >= 3100000} == {drop}
    # The aborted transaction: its released subtransaction is aborted first, then itself.
    other = [m for m in messages(2, StreamAbort) if isinstance(m, StreamAbort) and m.xid != top]
    assert len(other) == 2 and other[0].subxid != other[0].xid == other[1].xid == other[1].subxid


def _after_origin(d: Decoded) -> bool:
    index = DECODED[2].index(d)
    return type(DECODED[2][index + 1].message) is Origin


@pytest.mark.parametrize("proto", [1, 2])
def test_every_strict_prefix_and_any_extension_is_rejected(proto: int) -> None:
    for d in DECODED[proto]:
        payload = d.frame.payload
        for cut in range(len(payload)):
            decoder = _decoder_in(proto, d.in_stream)
            with pytest.raises(DecodeError) as info:
                decoder.decode(payload[:cut], LSN)
            assert info.value.lsn == LSN
            assert info.value.tag == (chr(payload[0]) if cut else None)
            assert decoder.in_stream_block is d.in_stream
        with pytest.raises(DecodeError):
            _decoder_in(proto, d.in_stream).decode(payload + b"\x00", LSN)


def _decoder_in(proto: int, in_stream: bool) -> PgOutputDecoder:
    decoder = PgOutputDecoder(proto)
    if in_stream:
        decoder.decode(b"S" + struct.pack("!IB", 1, 1), LSN)
    return decoder


def test_protocol_1_rejects_stream_messages() -> None:
    for d in DECODED[2]:
        if type(d.message) in STREAM_TYPES:
            with pytest.raises(DecodeError, match="proto_version 2"):
                PgOutputDecoder(1).decode(d.frame.payload, LSN)


def test_only_protocols_1_and_2() -> None:
    for proto in (0, 3, 4):
        with pytest.raises(ProtocolUsageError):
            PgOutputDecoder(proto)
    assert PgOutputDecoder(2).proto_version == 2


START = b"S" + struct.pack("!IB", 7, 1)


def test_stream_block_state() -> None:
    decoder = PgOutputDecoder(2)
    with pytest.raises(DecodeError, match="without a Stream Start"):
        decoder.decode(b"E", LSN)
    with pytest.raises(DecodeError):  # truncated: the state must not change
        decoder.decode(START[:-1], LSN)
    assert not decoder.in_stream_block
    assert decoder.decode(START, LSN) == StreamStart(7, True)
    with pytest.raises(DecodeError, match="do not nest"):
        decoder.decode(START, LSN)
    for tag in (b"c" + bytes(29), b"A" + bytes(8)):
        with pytest.raises(DecodeError, match="inside a stream block"):
            decoder.decode(tag, LSN)
    with pytest.raises(DecodeError):
        decoder.decode(b"E\x00", LSN)
    assert decoder.in_stream_block
    assert decoder.decode(b"E", LSN) == StreamStop()
    assert not decoder.in_stream_block
    assert decoder.decode(b"A" + struct.pack("!II", 7, 8), LSN) == StreamAbort(7, 8)


def _insert(values: list[bytes | Unchanged | None], *, kinds: bytes | None = None) -> bytes:
    out = bytearray(b"I" + struct.pack("!IcH", 16385, b"N", len(values)))
    for i, value in enumerate(values):
        kind = kinds[i : i + 1] if kinds else None
        if value is None:
            out += b"n"
        elif isinstance(value, Unchanged):
            out += b"u"
        else:
            out += (kind or b"t") + struct.pack("!I", len(value)) + value
    return bytes(out)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"Z", "unknown"),
        (_insert([b"a"]).replace(b"t\x00", b"x\x00"), "kind"),
        (_insert([b"ab"])[:-6] + b"t\xff\xff\xff\xfeab", "truncated"),  # negative length
        (b"I" + struct.pack("!IcH", 1, b"X", 0), "expected 'N'"),
        (b"D" + struct.pack("!IcH", 1, b"N", 0), "expected 'K' or 'O'"),
        (b"U" + struct.pack("!IcH", 1, b"Q", 0), "expected 'K', 'O' or 'N'"),
        (b"O" + bytes(8) + b"name", "NUL"),
        (b"Y" + bytes(4) + b"\xffbad\x00name\x00", "UTF-8"),
        (b"R" + bytes(4) + b"ns\x00rel\x00x" + bytes(2), "replica identity"),
        (b"M\x02" + bytes(8) + b"p\x00" + bytes(4), "flags"),
        (b"M\x00" + bytes(8) + b"p\x00" + struct.pack("!I", 5) + b"abc", "content"),
        (b"T" + struct.pack("!IB", 3, 0) + bytes(8), "do not fit"),
        (b"S" + struct.pack("!IB", 1, 2), "first-segment"),
        (b"I" + struct.pack("!IcH", 1, b"N", 9) + b"n", "cannot fit"),
    ],
)
def test_malformed_messages(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        PgOutputDecoder(2).decode(payload, LSN)
    assert info.value.lsn == LSN


VALUES = st.one_of(st.none(), st.just(UNCHANGED), st.binary(max_size=12))


@settings(max_examples=300)
@given(st.lists(VALUES, max_size=40), st.binary(min_size=40, max_size=40))
def test_tuples_decode_exactly(values: list[bytes | Unchanged | None], kinds: bytes) -> None:
    """The compiled tuple parsers against the values that were encoded, text and binary,
    the first time (general path, compiles) and the second (the Insert fast path)."""
    _check_tuple_round_trip(values, kinds)


@settings(max_examples=50)
@given(st.lists(VALUES, min_size=129, max_size=200), st.binary(min_size=200, max_size=200))
def test_wide_tuples_decode_exactly(values: list[bytes | Unchanged | None], kinds: bytes) -> None:
    """Wide tables: the generated parsers for many columns."""
    _check_tuple_round_trip(values, kinds)


def _check_tuple_round_trip(values: list[bytes | Unchanged | None], kinds: bytes) -> None:
    kinds = bytes(0x74 if k % 2 else 0x62 for k in kinds)
    payload = _insert(values, kinds=kinds)
    expected = Insert(None, 16385, tuple(values))
    for _ in range(2):
        message = PgOutputDecoder(1).decode(payload, LSN)
        assert message == expected and hash(message) == hash(expected)
    in_stream = _decoder_in(2, True)
    assert in_stream.decode(b"I" + struct.pack("!I", 42) + payload[1:], LSN) == Insert(
        42, 16385, tuple(values)
    )
    if len(payload) > 8:  # the last value cut short, or one byte too many
        with pytest.raises(DecodeError):
            PgOutputDecoder(1).decode(payload[:-1], LSN)
    with pytest.raises(DecodeError):
        PgOutputDecoder(1).decode(payload + b"t", LSN)


@given(st.binary(max_size=80), st.booleans(), st.sampled_from([1, 2]))
def test_garbage_gives_a_message_or_decode_error(buf: bytes, in_stream: bool, proto: int) -> None:
    _decode_or_error(_decoder_in(proto, in_stream and proto == 2), buf)


@given(st.sampled_from(b"BCORYIUDTMSEcA"), st.binary(max_size=60), st.booleans())
def test_garbage_behind_real_tags(tag: int, rest: bytes, in_stream: bool) -> None:
    _decode_or_error(_decoder_in(2, in_stream), bytes([tag]) + rest)


@settings(max_examples=300)
@given(st.data())
def test_mutated_captures_give_a_message_or_decode_error(data: st.DataObject) -> None:
    d = data.draw(st.sampled_from(DECODED[2]))
    payload = bytearray(d.frame.payload)
    at = data.draw(st.integers(0, len(payload) - 1))
    payload[at] = data.draw(st.integers(0, 255))
    _decode_or_error(_decoder_in(2, d.in_stream), bytes(payload))


def _decode_or_error(decoder: PgOutputDecoder, buf: bytes) -> None:
    try:
        message = decoder.decode(buf, LSN)
    except DecodeError as exc:
        assert exc.lsn == LSN
        return
    assert type(message) in PLAIN_TYPES | STREAM_TYPES


# --- the in-place Insert path -------------------------------------------------------


@pytest.mark.parametrize("proto", [1, 2])
def test_plain_insert_reads_captured_inserts_in_place(proto: int) -> None:
    """Exactly the Inserts decoded outside a stream block, read where they lie in a buffer
    (as in a frame, after its 25-byte header), equal to what `decode` makes of them."""
    decoder = PgOutputDecoder(proto)
    seen = 0
    for d in DECODED[proto]:
        got = decoder.plain_insert(bytes(25) + d.frame.payload, 25)
        if type(d.message) is Insert and not d.in_stream:
            assert got == (d.message.relation_oid, d.message.new)
            seen += 1
        else:
            assert got is None
        if type(d.message) in STREAM_TYPES:  # follow the stream-block state
            decoder.decode(d.frame.payload, LSN)
    assert seen >= 10


def test_plain_insert_declines_what_decode_must_handle() -> None:
    values: list[bytes | Unchanged | None] = [b"1", None, b"abc"]
    payload = _insert(values)
    PgOutputDecoder(1).decode(payload, LSN)  # compiles the parser for 3 columns
    decoder = PgOutputDecoder(2)
    assert decoder.plain_insert(payload, 0) == (16385, tuple(values))
    assert decoder.plain_insert(b"xx" + payload, 2) == (16385, tuple(values))
    assert decoder.plain_insert(payload[:-1], 0) is None  # truncated
    assert decoder.plain_insert(payload + b"\x00", 0) is None  # trailing bytes
    assert decoder.plain_insert(payload.replace(b"N", b"X", 1), 0) is None
    assert decoder.plain_insert(b"U" + payload[1:], 0) is None
    wide = _insert([b"1"] * 1663)
    assert _plain_insert(wide, 0) is None  # no parser compiled for the width yet
    assert decoder.plain_insert(wide, 0) in (None, (16385, (b"1",) * 1663))
    assert decoder.plain_insert(b"", 0) is None
    decoder.decode(START, LSN)
    assert decoder.plain_insert(payload, 0) is None  # in a stream block: xid first
    assert decoder.in_stream_block


@given(st.binary(max_size=80))
def test_plain_insert_never_raises(buf: bytes) -> None:
    decoder = PgOutputDecoder(2)
    for prefix in (b"", b"I", b"I" + struct.pack("!IcH", 7, b"N", 3)):
        got = decoder.plain_insert(prefix + buf, 0)
        if got is not None:
            assert decoder.decode(prefix + buf, LSN) == Insert(None, got[0], got[1])


# --- the compiled Insert path (stream._tuples) against the Python one -----------------
# The compiled reader of an Insert is reached through its one entry point, the frame loop:
# each message goes into an XLogData frame, pumped into a plain transaction whose relation
# is described.

needs_compiled = pytest.mark.skipif(
    not TransactionAssembler().pumps, reason="stream._tuples is not built"
)


def _pumped(payload: bytes) -> tuple[int, TupleData] | None:
    """The Insert message `payload` as the compiled frame loop reads it: its relation OID
    and values when it takes the frame, None when it hands the frame back."""
    assembler = TransactionAssembler()
    oid = struct.unpack_from("!I", payload, 1)[0] if len(payload) >= 5 else 0
    relation = Relation(None, oid, "public", "t", "d", ())
    assembler.feed(relation, LSN)
    assembler.feed(Begin(Lsn(200), 0, 1), LSN)
    frame = b"w" + struct.pack("!QQq", 0x10, 0x20, 0) + payload

    def get_copy_data(async_: bool) -> tuple[int, memoryview]:
        return len(frame), memoryview(bytearray(frame))

    taken, taken_bytes, end, rest = assembler.add_insert_frames(
        get_copy_data, 1, takes_inserts=True
    )
    if not taken:
        assert (taken_bytes, end, rest) == (0, 0, frame)
        return None
    assert (taken, taken_bytes, end, rest) == (1, len(frame), 0x20, None)
    txn = assembler.feed(Commit(0, Lsn(200), Lsn(210), 0), LSN)
    assert isinstance(txn, CommittedTransaction) and len(txn.inserts) == 1
    got, values = txn.inserts[0]
    assert got is relation and type(values) is tuple
    return oid, values


def _both(buf: bytes) -> tuple[object, object]:
    return _pumped(buf), _plain_insert(buf, 0)


@needs_compiled
@pytest.mark.parametrize("proto", [1, 2])
def test_compiled_insert_reader_matches_on_captured_messages(proto: int) -> None:
    for d in DECODED[proto]:
        if type(d.message) is Insert:  # the Python path needs the width's parser compiled
            width = len(d.message.new)
            _COMPILED.setdefault(width, _compile_columns(width))
    for d in DECODED[proto]:
        payload = d.frame.payload
        c, py = _both(payload)
        assert c == py
        for cut in range(len(payload)):  # every truncation
            assert _both(payload[:cut]) == (None, None)


VALUE = st.one_of(st.binary(max_size=6), st.none(), st.just(UNCHANGED))


@needs_compiled
@settings(max_examples=500)
@given(st.lists(VALUE, max_size=12), st.data())
def test_compiled_insert_reader_matches_on_generated_and_damaged_messages(
    values: list[bytes | Unchanged | None], data: st.DataObject
) -> None:
    payload = _insert(values)
    _COMPILED.setdefault(len(values), _compile_columns(len(values)))  # for the Python path
    c, py = _both(payload)
    assert c == py == (16385, tuple(values))
    # Damage one byte, or cut, or extend: both decline alike or read alike.
    i = data.draw(st.integers(0, len(payload) - 1))
    byte = data.draw(st.integers(0, 255))
    damaged = payload[:i] + bytes([byte]) + payload[i + 1 :]
    c, py = _both(damaged)
    assert c == _decoded_insert(damaged)  # `decode` is the definition of a message
    if py is not None:
        assert c == py
    assert _both(payload + data.draw(st.binary(min_size=1, max_size=3))) == (None, None)


def _decoded_insert(buf: bytes) -> tuple[int, TupleData] | None:
    """What the general decoder (not the Insert fast path `decode` tries first) reads."""
    try:
        message, end = PgOutputDecoder(2)._decode_other(buf[0], buf)
    except Exception:  # the general decoder rejects it (decode turns that into DecodeError)
        return None
    if end != len(buf) or type(message) is not Insert:
        return None
    return message.relation_oid, message.new


@needs_compiled
@given(st.binary(max_size=80))
def test_compiled_insert_reader_never_raises(buf: bytes) -> None:
    for prefix in (b"", b"I", b"I" + struct.pack("!IcH", 7, b"N", 3)):
        got = _pumped(prefix + buf)
        assert got == _decoded_insert(prefix + buf)


@needs_compiled
def test_compiled_insert_reader_reads_binary_and_unchanged_columns() -> None:
    head = b"I" + struct.pack("!I", 16385) + b"N" + struct.pack("!H", 3)
    payload = head + b"b" + struct.pack("!I", 3) + b"a\x00c" + b"u" + b"n"
    assert _pumped(payload) == _decoded_insert(payload) == (16385, (b"a\x00c", UNCHANGED, None))
    for kind in b"xTN\x00":  # not a column kind
        assert _pumped(head + bytes([kind]) + b"un") is None
