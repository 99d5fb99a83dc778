"""The frame reader: its fused Insert path against the general path (frame codec, decoder,
assembler one after the other) on captured streams, corrupted frames and protocol errors;
pumping frames (the compiled frame loop, when built, and the Python one) against feeding
them one by one."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.lsn import Lsn
from stream.errors import DecodeError
from stream.frames import XLOG_PAYLOAD_AT, PrimaryKeepalive, XLogData, parse_frame
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


@pytest.fixture(scope="module", params=["compiled", "python"])
def compiled(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The pump tests run on both frame loops: the compiled one (when built) and the Python
    one (a frame at a time through `feed`)."""
    if request.param == "compiled" and not FrameReader(2).compiled:
        pytest.skip("stream._tuples is not built")
    yield request.param == "compiled"


def test_the_compiled_frame_loop_is_used_only_when_asked_for() -> None:
    assert not FrameReader(2, compiled=False).compiled
    assert FrameReader(2).compiled == TransactionAssembler().pumps


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


def _prefix_until(
    proto: int, index: int, compiled: bool = False
) -> tuple[FrameReader, GeneralPath]:
    reader, general = FrameReader(proto, compiled=compiled), GeneralPath(proto)
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


def _with_wal_end_moved(proto: int) -> tuple[int, bytes, int]:
    """The first plain Insert frame with its WAL end moved beyond every position received
    before it: its index, the frame, the new WAL end. The server sends equal WAL start and
    end in XLogData, but a frame whose two differ must still advance the received position
    to its WAL end, as the general path does."""
    index = INSERTS[proto][0]
    buf = CAPTURES[proto][index]
    (start,) = struct.unpack_from("!Q", buf, 1)
    end = start + 0x100
    return index, buf[:9] + struct.pack("!Q", end) + buf[17:], end


@pytest.mark.parametrize("proto", [1, 2])
def test_the_received_position_is_the_frames_wal_end(proto: int) -> None:
    index, moved, end = _with_wal_end_moved(proto)
    reader, general = _prefix_until(proto, index)
    assert run(reader.feed, moved) == run(general.feed, moved)
    assert reader.received_lsn == general.received == end


# --- pump: frames read from the connection, plain Inserts taken in C ----------------------


class CopyData:
    """`get_copy_data` of a connection that has `frames` to hand out, as psycopg does:
    `(size, memoryview)`, `(0, ...)` at the positions in `empty` (libpq's buffer ran dry),
    `(-1, ...)` after the last frame (the copy ended), and `fail_at` raises instead of
    handing out that frame, as a broken connection does, on every call from then on."""

    def __init__(
        self, frames: list[bytes], empty: frozenset[int] = frozenset(), fail_at: int = -1
    ) -> None:
        self.frames = frames
        self.empty = set(empty)
        self.fail_at = fail_at
        self.at = 0

    def __call__(self, async_: bool) -> tuple[int, memoryview]:
        assert async_ is True
        if self.at == self.fail_at:
            raise OSError("connection lost")
        if self.at in self.empty:
            self.empty.discard(self.at)
            return 0, memoryview(b"")
        if self.at == len(self.frames):
            return -1, memoryview(b"")
        buf = self.frames[self.at]
        self.at += 1
        return len(buf), memoryview(bytearray(buf))  # a buffer, not bytes, as psycopg's


Log = list[tuple[object, ...]]


def pumped(reader: FrameReader, conn: CopyData, limits: list[int]) -> Log:
    """What the consumer does with `pump`: each output or error of `feed` with the received
    position then, until the copy ends or an error; last, the frames and bytes read."""
    log: Log = []
    frames = size = 0
    for n in range(1_000_000):
        taken, taken_bytes, rest = reader.pump(conn, limits[n % len(limits)])
        assert taken <= limits[n % len(limits)]
        assert (rest is None) == (taken == limits[n % len(limits)])
        frames += taken
        size += taken_bytes
        if isinstance(rest, bytes):
            frames += 1
            size += len(rest)
            out = run(reader.feed, rest)
            if out != Outcome(None, None):
                log.append((out, reader.received_lsn, reader.in_transaction))
            if out.error is not None:
                break
        elif rest is not None and rest < 0:
            break
    log.append((frames, size, reader.received_lsn, reader.buffered_rows))
    return log


def fed(reader: FrameReader, frames: list[bytes]) -> Log:
    log: Log = []
    count = size = 0
    for buf in frames:
        count += 1
        size += len(buf)
        out = run(reader.feed, buf)
        if out != Outcome(None, None):
            log.append((out, reader.received_lsn, reader.in_transaction))
        if out.error is not None:
            break
    log.append((count, size, reader.received_lsn, reader.buffered_rows))
    return log


LIMITS = st.lists(st.integers(1, 12), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2]), LIMITS, st.frozensets(st.integers(0, 120)))
def test_pumping_gives_what_feeding_gives(
    compiled: bool, proto: int, limits: list[int], empty: frozenset[int]
) -> None:
    frames = CAPTURES[proto]
    reader = FrameReader(proto, compiled=compiled)
    assert reader.compiled == compiled
    assert pumped(reader, CopyData(frames, empty), limits) == fed(
        FrameReader(proto, compiled=False), frames
    )


@pytest.mark.parametrize("proto", [1, 2])
def test_pumping_truncated_and_extended_inserts_fails_like_feeding(
    compiled: bool, proto: int
) -> None:
    for index in INSERTS[proto][:4]:
        buf = CAPTURES[proto][index]
        for bad in [buf[:cut] for cut in range(XLOG_PAYLOAD_AT + 1, len(buf))] + [
            buf + b"\x00",
            buf + b"t",
        ]:
            frames = [*CAPTURES[proto][:index], bad, *CAPTURES[proto][index + 1 :]]
            assert pumped(FrameReader(proto, compiled=compiled), CopyData(frames), [50]) == fed(
                FrameReader(proto, compiled=False), frames
            )


@settings(max_examples=300, deadline=None)
@given(st.data(), LIMITS)
def test_pumping_corrupted_inserts_fails_like_feeding(
    compiled: bool, data: st.DataObject, limits: list[int]
) -> None:
    proto = data.draw(st.sampled_from([1, 2]))
    index = data.draw(st.sampled_from(INSERTS[proto]))
    frames = list(CAPTURES[proto])
    buf = bytearray(frames[index])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(XLOG_PAYLOAD_AT + 1, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    frames[index] = bytes(buf)
    reader = FrameReader(proto, compiled=compiled)
    assert pumped(reader, CopyData(frames), limits) == fed(
        FrameReader(proto, compiled=False), frames
    )


@pytest.mark.parametrize("proto", [1, 2])
def test_a_connection_failing_while_pumping_raises_and_keeps_what_was_taken(
    compiled: bool, proto: int
) -> None:
    # Fail at the 3rd plain Insert of a run: the frames before it are taken and counted,
    # and the failure comes out of the next call (the connection keeps failing).
    start = next(i for i in INSERTS[proto] if all(i + k in INSERTS[proto] for k in range(3)))
    reader, general = _prefix_until(proto, start, compiled)
    conn = CopyData(CAPTURES[proto], fail_at=start + 2)
    conn.at = start
    taken, taken_bytes, rest = reader.pump(conn, 100)
    if compiled:
        assert (taken, rest) == (2, None)
        assert taken_bytes == sum(len(b) for b in CAPTURES[proto][start : start + 2])
        assert reader.buffered_rows == general.assembler.buffered_rows + 2
        with pytest.raises(OSError, match="connection lost"):
            reader.pump(conn, 100)
    else:
        assert (taken, rest) == (0, CAPTURES[proto][start])


@pytest.mark.parametrize("proto", [1, 2])
def test_pumping_moves_the_received_position_to_the_frames_wal_end(
    compiled: bool, proto: int
) -> None:
    index, moved, end = _with_wal_end_moved(proto)
    reader, general = _prefix_until(proto, index, compiled)
    conn = CopyData([moved])
    _, _, rest = reader.pump(conn, 1)
    if rest is not None:  # not taken in place: the caller feeds it
        assert isinstance(rest, bytes)
        reader.feed(rest)
    general.feed(moved)
    assert reader.received_lsn == general.received == end
