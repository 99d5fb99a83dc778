"""The replication frame codec: the CopyData payloads of a START_REPLICATION stream.

After START_REPLICATION the server sends CopyData messages of two kinds, and we answer with
one (PostgreSQL docs, "Streaming Replication Protocol"):

    'w' XLogData          Int64 wal start, Int64 wal end, Int64 send time, then the payload
                          (for logical replication: exactly one pgoutput message)
    'k' Primary keepalive Int64 wal end, Int64 send time, Byte1 reply requested (0 or 1)
    'r' Standby status    Int64 write, Int64 flush, Int64 apply, Int64 client time,
        update (ours)     Byte1 reply requested

All integers are big-endian. Server times count microseconds since 2000-01-01 (the
PostgreSQL epoch); inside our code every time is int microseconds since the Unix epoch,
UTC, and this module is the one place that converts.

Sans-IO: bytes in, frozen values out, and back. No socket, no clock: the caller passes
`now_us` when it encodes a status update.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from core.lsn import Lsn
from stream.errors import DecodeError, ProtocolUsageError

PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000
"""Microseconds from 1970-01-01 to 2000-01-01 (both UTC): Unix µs = PostgreSQL µs + this."""

# Header layouts. LSNs are unsigned 64-bit ('Q'); times are signed 64-bit ('q').
_XLOG_HEADER: Final = struct.Struct("!QQq")  # after the 'w' tag
_KEEPALIVE: Final = struct.Struct("!QqB")  # after the 'k' tag
_STATUS_UPDATE: Final = struct.Struct("!cQQQqB")

XLOG_PAYLOAD_AT: Final = 1 + _XLOG_HEADER.size
"""25: where the pgoutput message of an XLogData frame starts."""
_WAL_END: Final = struct.Struct("!Q")
_WAL_END_AT: Final = 9  # after the 'w' tag and the wal start
_KEEPALIVE_SIZE: Final = 1 + _KEEPALIVE.size  # 18: a keepalive is exactly this long

_TAG_XLOG: Final = 0x77  # 'w'
_TAG_KEEPALIVE: Final = 0x6B  # 'k'

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1

# `Lsn.__new__` checks the range in Python; values unpacked with 'Q' are in range by
# construction, so the hot path builds them with the cheaper `int.__new__`.
_new_lsn: Final = int.__new__


@dataclass(frozen=True, slots=True)
class XLogData:
    """A 'w' frame: one pgoutput message and the WAL position it was decoded at.

    For logical replication `wal_start` is the LSN of the WAL record the message came from
    (several messages may share one); `wal_end` is the server's WAL end when it sent it.
    """

    wal_start: Lsn
    wal_end: Lsn
    send_time_us: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """A 'k' frame. When `reply_requested` is true the server disconnects us after
    `wal_sender_timeout` unless a status update arrives: answer it at once."""

    wal_end: Lsn
    send_time_us: int
    reply_requested: bool


def parse_frame(buf: bytes) -> XLogData | PrimaryKeepalive:
    """Decode one CopyData payload received on a replication connection.

    Raises `DecodeError` (with the tag and, once the header is read, the LSN) for an empty
    buffer, an unknown tag, a short header, trailing bytes after a keepalive or a reply
    flag other than 0/1. Nothing else escapes.
    """
    if not buf:
        raise DecodeError("empty replication frame")
    tag = buf[0]
    if tag == _TAG_XLOG:
        if len(buf) < XLOG_PAYLOAD_AT:
            raise DecodeError(
                f"XLogData header truncated: {len(buf)} bytes, need {XLOG_PAYLOAD_AT}",
                tag="w",
            )
        start, end, sent = _XLOG_HEADER.unpack_from(buf, 1)
        # One frame per row: built without the frozen-dataclass __init__ (which goes
        # through object.__setattr__ per field); equal to XLogData(...), tests check it.
        frame = _object_new(XLogData)
        _set_wal_start(frame, _new_lsn(Lsn, start))
        _set_wal_end(frame, _new_lsn(Lsn, end))
        _set_send_time(frame, sent + PG_EPOCH_OFFSET_US)
        _set_payload(frame, buf[XLOG_PAYLOAD_AT:])
        return frame
    if tag == _TAG_KEEPALIVE:
        if len(buf) < _KEEPALIVE_SIZE:
            raise DecodeError(
                f"keepalive truncated: {len(buf)} bytes, need {_KEEPALIVE_SIZE}", tag="k"
            )
        end, sent, reply = _KEEPALIVE.unpack_from(buf, 1)
        if len(buf) != _KEEPALIVE_SIZE:
            raise DecodeError(
                f"keepalive has {len(buf) - _KEEPALIVE_SIZE} trailing bytes", lsn=end, tag="k"
            )
        if reply > 1:
            raise DecodeError(f"keepalive reply flag is {reply}, not 0 or 1", lsn=end, tag="k")
        return PrimaryKeepalive(_new_lsn(Lsn, end), sent + PG_EPOCH_OFFSET_US, reply == 1)
    raise DecodeError(f"unknown replication frame tag {tag:#04x}", tag=_tag_text(tag))


def xlog_wal_end(buf: bytes) -> int:
    """The WAL end field of an XLogData frame: for a caller that read the rest of the frame
    in place and so never built an `XLogData`. `buf` must be a 'w' frame with a complete
    header (at least `XLOG_PAYLOAD_AT` bytes); its value fits an `Lsn` by construction."""
    end: int = _WAL_END.unpack_from(buf, _WAL_END_AT)[0]
    return end


_object_new: Final = object.__new__
_set_wal_start: Final = XLogData.__dict__["wal_start"].__set__
_set_wal_end: Final = XLogData.__dict__["wal_end"].__set__
_set_send_time: Final = XLogData.__dict__["send_time_us"].__set__
_set_payload: Final = XLogData.__dict__["payload"].__set__


def encode_status_update(
    *, write: Lsn, flush: Lsn, apply: Lsn, now_us: int, reply_requested: bool = False
) -> bytes:
    """Encode our 'r' standby status update.

    Invariant the caller owns: `flush` is what the server may discard WAL up to (the slot's
    confirmed position), so it must never exceed what is durably applied on our side.
    `now_us` is Unix microseconds; raises `ProtocolUsageError` if a value does not fit.
    """
    pg_time = now_us - PG_EPOCH_OFFSET_US
    if not _INT64_MIN <= pg_time <= _INT64_MAX:
        raise ProtocolUsageError(f"status update time out of range: {now_us} µs")
    try:
        return _STATUS_UPDATE.pack(b"r", write, flush, apply, pg_time, 1 if reply_requested else 0)
    except struct.error as exc:
        raise ProtocolUsageError(f"status update LSN out of range: {exc}") from exc


def _tag_text(tag: int) -> str:
    """The tag as the one-letter text DecodeError carries (escaped when unprintable)."""
    return chr(tag) if 0x20 < tag < 0x7F else f"\\x{tag:02x}"
