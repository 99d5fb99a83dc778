"""The replication frame codec against captured frames, hand-built bytes and garbage."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.lsn import Lsn
from stream.errors import DecodeError, ProtocolUsageError
from stream.frames import (
    PG_EPOCH_OFFSET_US,
    XLOG_PAYLOAD_AT,
    PrimaryKeepalive,
    XLogData,
    encode_status_update,
    parse_frame,
    xlog_wal_end,
)
from tests.data.capture_pgoutput import load_capture

CAPTURES = {proto: load_capture(proto) for proto in (1, 2)}
ALL_FRAMES = [frame for frames in CAPTURES.values() for frame in frames]

# Unix µs of 2020-01-01 and 2100-01-01: server clocks in captures fall in between.
_2020_US = 1_577_836_800_000_000
_2100_US = 4_102_444_800_000_000


def test_pg_epoch_offset_is_2000_01_01() -> None:
    delta = datetime(2000, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    assert PG_EPOCH_OFFSET_US == delta // timedelta(microseconds=1)


@pytest.mark.parametrize("proto", [1, 2])
def test_every_captured_frame_parses(proto: int) -> None:
    frames = CAPTURES[proto]
    parsed = [parse_frame(c.frame) for c in frames]
    for captured, frame in zip(frames, parsed, strict=True):
        if captured.kind == "w":
            assert type(frame) is XLogData
            assert frame.payload == captured.frame[25:]
            assert chr(frame.payload[0]) == captured.tag
            # Logical walsenders send the record LSN as both start and end, or 0/0 for a
            # message that is not the last one written for its record (Relation, Type,
            # a Begin or Stream Start followed by an Origin).
            assert frame.wal_end == frame.wal_start
            assert _2020_US < frame.send_time_us < _2100_US
        else:
            assert type(frame) is PrimaryKeepalive
            assert frame.wal_end > 0
            assert _2020_US < frame.send_time_us < _2100_US
    keepalives = [f for f in parsed if type(f) is PrimaryKeepalive]
    assert {k.reply_requested for k in keepalives} == {False, True}
    assert sum(type(f) is XLogData for f in parsed) > 50


def test_relation_and_type_frames_carry_no_lsn() -> None:
    for captured in ALL_FRAMES:
        frame = parse_frame(captured.frame)
        if type(frame) is XLogData and captured.tag in ("R", "Y"):
            assert frame.wal_start == 0


def test_keepalive_fields() -> None:
    pg_time = 123_456_789
    buf = b"k" + struct.pack("!QqB", 0x16_B374_D848, pg_time, 1)
    frame = parse_frame(buf)
    assert frame == PrimaryKeepalive(Lsn.parse("16/B374D848"), pg_time + PG_EPOCH_OFFSET_US, True)
    assert type(frame.wal_end) is Lsn


def test_xlogdata_fields() -> None:
    buf = b"w" + struct.pack("!QQq", 1, 2, -5) + b"Bxyz"
    frame = parse_frame(buf)
    expected = XLogData(Lsn(1), Lsn(2), PG_EPOCH_OFFSET_US - 5, b"Bxyz")
    assert frame == expected and hash(frame) == hash(expected) and repr(frame) == repr(expected)
    assert type(frame.wal_start) is Lsn and type(frame.wal_end) is Lsn
    assert parse_frame(buf[:25]) == XLogData(Lsn(1), Lsn(2), PG_EPOCH_OFFSET_US - 5, b"")


def test_status_update_matches_hand_computed_bytes() -> None:
    encoded = encode_status_update(
        write=Lsn.parse("1/2"),
        flush=Lsn(0x10),
        apply=Lsn(0x0F),
        now_us=PG_EPOCH_OFFSET_US + 1_000_000,
        reply_requested=True,
    )
    expected = bytes.fromhex(
        "72"  # 'r'
        "0000000100000002"  # write 1/2
        "0000000000000010"  # flush
        "000000000000000f"  # apply
        "00000000000f4240"  # 1 s after 2000-01-01, in µs
        "01"  # reply requested
    )
    assert encoded == expected
    assert (
        encode_status_update(
            write=Lsn(0), flush=Lsn(0), apply=Lsn(0), now_us=PG_EPOCH_OFFSET_US - 1
        )
        == b"r" + bytes(24) + b"\xff" * 8 + b"\x00"
    )


def test_status_update_time_out_of_range() -> None:
    with pytest.raises(ProtocolUsageError):
        encode_status_update(
            write=Lsn(0), flush=Lsn(0), apply=Lsn(0), now_us=PG_EPOCH_OFFSET_US + (1 << 63)
        )


@pytest.mark.parametrize(
    ("buf", "tag", "has_lsn"),
    [
        (b"", None, False),
        (b"x" + bytes(24), "x", False),
        (b"\x00", "\\x00", False),
        (b"w" + bytes(23), "w", False),
        (b"k" + bytes(16), "k", False),
        (b"k" + bytes(18), "k", True),  # a trailing byte
        (b"k" + struct.pack("!QqB", 5, 0, 2), "k", True),  # reply flag must be 0 or 1
    ],
)
def test_bad_frames(buf: bytes, tag: str | None, has_lsn: bool) -> None:
    with pytest.raises(DecodeError) as info:
        parse_frame(buf)
    assert info.value.tag == tag
    assert (info.value.lsn is not None) is has_lsn


def test_every_truncated_header_is_rejected() -> None:
    for captured in ALL_FRAMES:
        header = 25 if captured.kind == "w" else 18
        for cut in range(header):
            with pytest.raises(DecodeError):
                parse_frame(captured.frame[:cut])


@given(st.binary(max_size=64))
def test_garbage_gives_a_frame_or_decode_error(buf: bytes) -> None:
    _parse_or_decode_error(buf)


@given(st.sampled_from(b"wkr"), st.binary(max_size=40))
def test_garbage_with_real_tags(tag: int, rest: bytes) -> None:
    _parse_or_decode_error(bytes([tag]) + rest)


def _parse_or_decode_error(buf: bytes) -> None:
    try:
        frame = parse_frame(buf)
    except DecodeError:
        return
    assert type(frame) in (XLogData, PrimaryKeepalive)


def test_the_in_place_readers_agree_with_parse_frame() -> None:
    for captured in ALL_FRAMES:
        frame = parse_frame(captured.frame)
        if type(frame) is XLogData:
            assert xlog_wal_end(captured.frame) == frame.wal_end
            assert captured.frame[XLOG_PAYLOAD_AT:] == frame.payload
    head = b"w" + struct.pack("!QQq", 1, (1 << 64) - 1, 0)
    assert xlog_wal_end(head) == (1 << 64) - 1
