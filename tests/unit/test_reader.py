"""The frame reader: its fused Insert path against the general path (frame codec, decoder,
assembler one after the other) on captured streams, corrupted frames and protocol errors."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mission_runner.errors import DecodeError
from stream import reader as reader_module
from stream import transactions
from stream.frames import XLOG_PAYLOAD_AT, PrimaryKeepalive, XLogData, parse_frame
from stream.lsn import Lsn
from stream.pgoutput import PgOutputDecoder
from stream.reader import FrameReader, ReaderOutput
from stream.transactions import CommittedTransaction, TransactionAssembler
from tests.data.capture_pgoutput import load_capture

CAPTURES = {proto: [c.frame for c in load_capture(proto)] for proto in (1, 2)}


class GeneralPath:
    """What the consumer did before the reader: every frame through all three stages."""

    def __init__(self, proto: int) -> None:
        self.decoder = PgOutputDecoder(proto)
        self.assembler = TransactionAssembler()
        self.received = 0

    def feed(self, buf: bytes) -> ReaderOutput:
        frame = parse_frame(buf)
        self.received = max(self.received, frame.wal_end)
        if type(frame) is XLogData:
            message = self.decoder.decode(frame.payload, frame.wal_start)
            return self.assembler.feed(message, frame.wal_start)
        assert type(frame) is PrimaryKeepalive
        return frame


@dataclass(frozen=True)
class Outcome:
    output: ReaderOutput
    error: tuple[str, int | None, str | None] | None


@pytest.fixture(autouse=True, scope="module", params=["compiled", "python"])
def fused_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs on both fused Insert paths: the compiled one (when built) and
    the Python one (`plain_insert` + `add_insert`)."""
    if request.param == "compiled" and not transactions.COMPILED_INSERT_FRAMES:
        pytest.skip("stream._tuples is not built")
    saved = reader_module.COMPILED_INSERT_FRAMES
    reader_module.COMPILED_INSERT_FRAMES = request.param == "compiled"  # type: ignore[misc]
    yield request.param
    reader_module.COMPILED_INSERT_FRAMES = saved  # type: ignore[misc]


def run(feed: object, buf: bytes) -> Outcome:
    assert callable(feed)
    try:
        return Outcome(feed(buf), None)
    except DecodeError as exc:
        return Outcome(None, (str(exc), exc.lsn, exc.tag))


@pytest.mark.parametrize("proto", [1, 2])
def test_captured_streams_give_what_the_general_path_gives(proto: int) -> None:
    reader, general = FrameReader(proto), GeneralPath(proto)
    outputs = []
    for buf in CAPTURES[proto]:
        got = reader.feed(buf)
        assert got == general.feed(buf)
        assert reader.received_lsn == general.received
        assert type(reader.received_lsn) is Lsn
        assert reader.in_transaction == general.assembler.in_transaction
        assert reader.buffered_rows == general.assembler.buffered_rows
        if got is not None:
            outputs.append(got)
    assert dict(reader.relations) == dict(general.assembler.relations)
    kinds = {type(o) for o in outputs}
    assert CommittedTransaction in kinds and PrimaryKeepalive in kinds
    rows = sum(len(o.inserts) for o in outputs if isinstance(o, CommittedTransaction))
    assert rows >= 10


def test_the_fused_path_carries_the_plain_inserts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain Inserts never reach the general path (which would still be correct, only
    slow): `parse_frame` sees every other frame and none of them."""
    parsed: list[bytes] = []

    def spy(buf: bytes) -> XLogData | PrimaryKeepalive:
        parsed.append(buf)
        return parse_frame(buf)

    monkeypatch.setattr("stream.reader.parse_frame", spy)
    reader = FrameReader(2)
    for buf in CAPTURES[2]:
        reader.feed(buf)
    plain = [CAPTURES[2][i] for i in INSERTS[2]]
    assert len(parsed) == len(CAPTURES[2]) - len(plain)
    assert not set(plain) & set(parsed) and len(plain) >= 10


def _prefix_until(proto: int, index: int) -> tuple[FrameReader, GeneralPath]:
    reader, general = FrameReader(proto), GeneralPath(proto)
    for buf in CAPTURES[proto][:index]:
        reader.feed(buf)
        general.feed(buf)
    return reader, general


def _plain_insert_frames(proto: int) -> list[int]:
    """Positions of the Insert frames of plain transactions: decoded outside a stream
    block, with a transaction open."""
    general = GeneralPath(proto)
    hits = []
    for i, buf in enumerate(CAPTURES[proto]):
        if (
            buf[0] == ord("w")
            and buf[XLOG_PAYLOAD_AT] == ord("I")
            and not general.decoder.in_stream_block
            and general.assembler.in_transaction
        ):
            hits.append(i)
        general.feed(buf)
    return hits


INSERTS = {proto: _plain_insert_frames(proto) for proto in (1, 2)}


@pytest.mark.parametrize("proto", [1, 2])
def test_truncated_and_extended_inserts_fail_like_the_general_path(proto: int) -> None:
    for index in INSERTS[proto][:8]:
        buf = CAPTURES[proto][index]
        for bad in [buf[:cut] for cut in range(XLOG_PAYLOAD_AT + 1, len(buf))] + [
            buf + b"\x00",
            buf + b"t",
        ]:
            reader, general = _prefix_until(proto, index)
            got, expected = run(reader.feed, bad), run(general.feed, bad)
            assert got == expected
            assert got.error is not None
            _, lsn, tag = got.error
            assert tag == "I" and lsn == struct.unpack_from("!Q", buf, 1)[0]


@settings(max_examples=400)
@given(st.data())
def test_corrupted_inserts_fail_or_succeed_like_the_general_path(data: st.DataObject) -> None:
    proto = data.draw(st.sampled_from([1, 2]))
    index = data.draw(st.sampled_from(INSERTS[proto]))
    buf = bytearray(CAPTURES[proto][index])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(XLOG_PAYLOAD_AT + 1, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    reader, general = _prefix_until(proto, index)
    assert run(reader.feed, bytes(buf)) == run(general.feed, bytes(buf))
    assert reader.buffered_rows == general.assembler.buffered_rows


def _insert_frame(oid: int, values: list[bytes], lsn: int = 0x10) -> bytes:
    message = b"I" + struct.pack("!IcH", oid, b"N", len(values))
    for value in values:
        message += b"t" + struct.pack("!I", len(value)) + value
    return b"w" + struct.pack("!QQq", lsn, lsn, 0) + message


def test_an_insert_outside_a_transaction_is_a_protocol_error() -> None:
    proto = 1
    first_insert = INSERTS[proto][0]
    reader, _ = _prefix_until(proto, first_insert)
    relation_oid = next(iter(reader.relations))
    reader = FrameReader(proto)
    for buf in CAPTURES[proto][:first_insert]:
        if buf[0] == ord("w") and buf[XLOG_PAYLOAD_AT] in b"RY":  # relations, no Begin
            reader.feed(buf)
    frame = _insert_frame(relation_oid, [b"x"] * len(reader.relations[relation_oid].columns))
    with pytest.raises(DecodeError, match="outside a transaction") as info:
        reader.feed(frame)
    assert info.value.lsn == 0x10 and info.value.tag == "I"


def test_an_insert_for_an_unknown_relation_is_a_protocol_error() -> None:
    proto = 1
    first_insert = INSERTS[proto][0]
    reader, _ = _prefix_until(proto, first_insert)
    with pytest.raises(DecodeError, match="no Relation message") as info:
        reader.feed(_insert_frame(999_999, [b"1"]))
    assert info.value.tag == "I"
    assert reader.in_transaction  # the open transaction is still there, as before


@given(st.binary(max_size=60))
def test_garbage_frames_give_an_output_or_decode_error(buf: bytes) -> None:
    for prefix in (b"", b"w" + bytes(24), b"w" + bytes(24) + b"I"):
        try:
            FrameReader(2).feed(prefix + buf)
        except DecodeError:
            pass


@pytest.mark.parametrize("proto", [1, 2])
def test_the_received_position_is_the_frames_wal_end(proto: int) -> None:
    # The server sends equal WAL start and end in XLogData; a frame whose two differ must
    # still advance the received position to its WAL end, as the general path does.
    index = INSERTS[proto][0]
    buf = CAPTURES[proto][index]
    (start,) = struct.unpack_from("!Q", buf, 1)
    end = start + 0x100  # beyond every position received before
    moved = buf[:9] + struct.pack("!Q", end) + buf[17:]
    reader, general = _prefix_until(proto, index)
    assert run(reader.feed, moved) == run(general.feed, moved)
    assert reader.received_lsn == general.received == end
