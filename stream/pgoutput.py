"""A strict decoder for pgoutput messages, protocol versions 1 and 2.

Each XLogData frame of a logical replication stream carries exactly one pgoutput message
(PostgreSQL docs, "Logical Replication Message Formats"). `PgOutputDecoder.decode` turns
one such payload into one frozen message value. It is sans-IO and keeps a single bit of
state: whether it is inside a Stream Start ... Stream Stop block, where Relation, Type,
Insert, Update, Delete, Truncate and Message carry a leading xid (protocol 2 only).

Strictness is the contract: a payload is either decoded exactly, every byte consumed, or
rejected with a `DecodeError` carrying the LSN and the message tag. Foreign exceptions
(IndexError, struct.error, UnicodeDecodeError, ...) never escape; they are translated at
the `decode` boundary.

Insert is the hot path (hundreds of thousands per second), so its column parsing is
written for speed: generated unrolled parsers, one struct call per non-null column, no
per-column bounds check. That is safe because of one invariant of `_columns`: the read
position only ever moves forward, and a value slice that the buffer cut short leaves the
position past the end, so every later read fails and the final "consumed exactly" check
cannot pass. `plain_insert` goes one step further for the consumer: it reads an Insert
where it lies in the frame, with no payload copy and no message object.

The message values themselves live in `stream.messages`; this module re-exports them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final, TypeAlias, cast

from core.lsn import Lsn
from stream.errors import DecodeError, ProtocolUsageError
from stream.frames import PG_EPOCH_OFFSET_US
from stream.messages import (
    UNCHANGED,
    Begin,
    Column,
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

__all__ = [
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Origin",
    "PgOutputDecoder",
    "PgOutputMessage",
    "Relation",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "Unchanged",
    "Update",
]


class _Malformed(Exception):
    """Internal: the payload is wrong in a way we can describe. Never leaves the module."""


# Layouts after the tag byte (and after the xid, where one is present). LSNs, xids and
# OIDs are unsigned; times and type modifiers are signed.
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_OID_KIND: Final = struct.Struct("!IB")
_INSERT_HEAD: Final = struct.Struct("!BIBH")  # 'I', relation OID, 'N', column count
_KIND_LENGTH: Final = struct.Struct("!BI")  # a column's kind byte and Int32 length
_BEGIN: Final = struct.Struct("!QqI")
_COMMIT: Final = struct.Struct("!BQQq")
_ORIGIN_LSN: Final = struct.Struct("!Q")
_IDENT_NCOLS: Final = struct.Struct("!BH")
_COLUMN_TYPE: Final = struct.Struct("!Ii")
_TRUNCATE_HEAD: Final = struct.Struct("!IB")
_MESSAGE_HEAD: Final = struct.Struct("!BQ")
_STREAM_START: Final = struct.Struct("!IB")
_STREAM_COMMIT: Final = struct.Struct("!IBQQq")
_STREAM_ABORT: Final = struct.Struct("!II")

_new_lsn: Final = int.__new__  # 'Q'-unpacked values are in Lsn's range by construction

_NEW, _KEY, _OLD = 0x4E, 0x4B, 0x4F  # 'N' 'K' 'O'
_INSERT: Final = 0x49  # 'I'
_REPLICA_IDENTITIES: Final = frozenset("dnfi")
_STREAM_TAGS: Final = frozenset(b"SEcA")


def _tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """Parse TupleData at `pos` (Int16 column count, then the columns)."""
    (count,) = _U16.unpack_from(buf, pos)
    return _columns(buf, pos + 2, count)


def _columns(buf: bytes, pos: int, count: int) -> tuple[TupleData, int]:
    """Parse `count` columns at `pos`; returns the values and the end position.

    Per column: a kind byte and, for 't' and 'b', an Int32 length and that many bytes.
    Lengths are read unsigned: a negative Int32 becomes >= 2**31 and runs past the end,
    which the caller's exact-length check (or the next read) rejects.
    """
    if count > len(buf) - pos or count > _MAX_COLUMNS:  # a column takes at least a byte
        raise _Malformed(f"tuple of {count} columns cannot fit in the message")
    parse = _COMPILED.get(count)
    if parse is None:
        parse = _COMPILED[count] = _compile_columns(count)
    return parse(buf, pos)


def _other_column(buf: bytes, pos: int, i: int) -> tuple[bytes | Unchanged, int]:
    """The rarer column kinds, 'b' and 'u', out of the compiled parsers' way."""
    kind = buf[pos]
    if kind == 0x62:  # 'b'
        start = pos + 5
        end = start + _U32.unpack_from(buf, pos + 1)[0]
        return buf[start:end], end
    if kind == 0x75:  # 'u'
        return UNCHANGED, pos + 1
    raise _Malformed(f"column {i}: bad tuple value kind {kind:#04x}")


# The Insert hot path spends most of its time parsing columns, and an unrolled parser (no
# loop counter, no list, the tuple built at once) is ~20% faster than a loop. So, like the
# stdlib's dataclasses, we generate one for each column count we meet (at most
# MaxTupleAttributeNumber), from these templates and nothing but integers; unit tests
# check them against an independent encoder.
#
# 't' (text) and 'n' (NULL) are handled inline. All but the last four columns read the
# kind byte and the length in one struct call, which needs five bytes: that cannot fail
# on a well-formed message (four more columns of at least one byte each follow), and on
# a malformed one the struct.error is translated like any other truncation.
_MAX_COLUMNS: Final = 1664
_COLUMN_SOURCE_AHEAD: Final = """\
    kind, size = kind_len(buf, pos)
    if kind == 0x74:
        start = pos + 5
        pos = start + size
        v{i} = buf[start:pos]
"""
_COLUMN_SOURCE_TAIL: Final = """\
    kind = buf[pos]
    if kind == 0x74:
        start = pos + 5
        pos = start + length_at(buf, pos + 1)[0]
        v{i} = buf[start:pos]
"""
_COLUMN_SOURCE_OTHER: Final = """\
    elif kind == 0x6E:
        v{i} = None
        pos += 1
    else:
        v{i}, pos = other(buf, pos, {i})
"""
_ColumnsParser: TypeAlias = Callable[[bytes, int], tuple[TupleData, int]]
_COMPILED: Final[dict[int, _ColumnsParser]] = {}  # a memo of pure functions, not state


def _compile_columns(count: int) -> _ColumnsParser:
    body = "".join(
        (_COLUMN_SOURCE_AHEAD if i < count - 4 else _COLUMN_SOURCE_TAIL).format(i=i)
        + _COLUMN_SOURCE_OTHER.format(i=i)
        for i in range(count)
    )
    values = "".join(f"v{i}, " for i in range(count))
    source = (
        "def parse(buf, pos, kind_len=kind_len, length_at=length_at, other=other):\n"
        f"{body}    return ({values}), pos\n"
    )
    namespace: dict[str, object] = {
        "kind_len": _KIND_LENGTH.unpack_from,
        "length_at": _U32.unpack_from,
        "other": _other_column,
    }
    exec(source, namespace)
    return cast(_ColumnsParser, namespace["parse"])


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated UTF-8 string at `pos`; returns it and the position after the NUL."""
    end = buf.find(b"\0", pos)
    if end < 0:
        raise _Malformed(f"string at offset {pos} has no NUL terminator")
    try:
        return buf[pos:end].decode("utf-8"), end + 1
    except UnicodeDecodeError:
        raise _Malformed(f"string at offset {pos} is not valid UTF-8") from None


def _begin(buf: bytes, pos: int, xid: int | None) -> tuple[Begin, int]:
    final_lsn, time_pg, txid = _BEGIN.unpack_from(buf, pos)
    return Begin(_new_lsn(Lsn, final_lsn), time_pg + PG_EPOCH_OFFSET_US, txid), pos + 20


def _commit(buf: bytes, pos: int, xid: int | None) -> tuple[Commit, int]:
    flags, commit_lsn, end_lsn, time_pg = _COMMIT.unpack_from(buf, pos)
    commit = Commit(
        flags, _new_lsn(Lsn, commit_lsn), _new_lsn(Lsn, end_lsn), time_pg + PG_EPOCH_OFFSET_US
    )
    return commit, pos + 25


def _origin(buf: bytes, pos: int, xid: int | None) -> tuple[Origin, int]:
    (commit_lsn,) = _ORIGIN_LSN.unpack_from(buf, pos)
    name, pos = _string(buf, pos + 8)
    return Origin(_new_lsn(Lsn, commit_lsn), name), pos


def _relation(buf: bytes, pos: int, xid: int | None) -> tuple[Relation, int]:
    (oid,) = _U32.unpack_from(buf, pos)
    namespace, pos = _string(buf, pos + 4)
    name, pos = _string(buf, pos)
    ident, count = _IDENT_NCOLS.unpack_from(buf, pos)
    identity = chr(ident)
    if identity not in _REPLICA_IDENTITIES:
        raise _Malformed(f"relation {name!r}: unknown replica identity {ident:#04x}")
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column_name, pos = _string(buf, pos + 1)
        type_oid, type_modifier = _COLUMN_TYPE.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(flags, column_name, type_oid, type_modifier))
    return Relation(xid, oid, namespace, name, identity, tuple(columns)), pos


def _type(buf: bytes, pos: int, xid: int | None) -> tuple[Type, int]:
    (oid,) = _U32.unpack_from(buf, pos)
    namespace, pos = _string(buf, pos + 4)
    name, pos = _string(buf, pos)
    return Type(xid, oid, namespace, name), pos


def _insert(buf: bytes, pos: int, xid: int | None) -> tuple[Insert, int]:
    oid, marker = _OID_KIND.unpack_from(buf, pos)
    if marker != _NEW:
        raise _Malformed(f"Insert: expected 'N' before the tuple, got {marker:#04x}")
    new, pos = _tuple(buf, pos + 5)
    return Insert(xid, oid, new), pos


def _update(buf: bytes, pos: int, xid: int | None) -> tuple[Update, int]:
    oid, marker = _OID_KIND.unpack_from(buf, pos)
    pos += 5
    old_kind: str | None = None
    old: TupleData | None = None
    if marker == _KEY or marker == _OLD:
        old_kind = chr(marker)
        old, pos = _tuple(buf, pos)
        marker = buf[pos]
        pos += 1
    if marker != _NEW:
        raise _Malformed(f"Update: expected 'K', 'O' or 'N', got {marker:#04x}")
    new, pos = _tuple(buf, pos)
    return Update(xid, oid, old_kind, old, new), pos


def _delete(buf: bytes, pos: int, xid: int | None) -> tuple[Delete, int]:
    oid, marker = _OID_KIND.unpack_from(buf, pos)
    if marker != _KEY and marker != _OLD:
        raise _Malformed(f"Delete: expected 'K' or 'O', got {marker:#04x}")
    old, pos = _tuple(buf, pos + 5)
    return Delete(xid, oid, chr(marker), old), pos


def _truncate(buf: bytes, pos: int, xid: int | None) -> tuple[Truncate, int]:
    count, options = _TRUNCATE_HEAD.unpack_from(buf, pos)
    pos += 5
    end = pos + 4 * count
    if end > len(buf):
        raise _Malformed(f"Truncate: {count} relation OIDs do not fit in the message")
    oids = struct.unpack_from(f"!{count}I", buf, pos)
    return Truncate(xid, options, oids), end


def _message(buf: bytes, pos: int, xid: int | None) -> tuple[LogicalMessage, int]:
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, pos)
    if flags > 1:
        raise _Malformed(f"Message: unknown flags {flags:#04x}")
    prefix, pos = _string(buf, pos + 9)
    (size,) = _U32.unpack_from(buf, pos)
    pos += 4
    end = pos + size
    if end > len(buf):
        raise _Malformed(f"Message: content of {size} bytes runs past the end")
    return LogicalMessage(xid, flags == 1, _new_lsn(Lsn, lsn), prefix, buf[pos:end]), end


def _fast_insert(oid: int, new: TupleData) -> Insert:
    """`Insert(None, oid, new)` without the frozen-dataclass `__init__` (which goes
    through `object.__setattr__` per field): the slot descriptors set the same fields.
    Equal to the normal constructor's result; a unit test holds it to that."""
    insert = _object_new(Insert)
    _set_insert_xid(insert, None)
    _set_insert_oid(insert, oid)
    _set_insert_new(insert, new)
    return insert


_object_new: Final = object.__new__
_set_insert_xid: Final = Insert.__dict__["xid"].__set__
_set_insert_oid: Final = Insert.__dict__["relation_oid"].__set__
_set_insert_new: Final = Insert.__dict__["new"].__set__

_Handler: TypeAlias = Callable[[bytes, int, "int | None"], tuple[PgOutputMessage, int]]

# Messages that carry a leading xid inside a stream block (protocol 2).
_XID_IN_STREAM: Final[dict[int, _Handler]] = {
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
}
_HANDLERS: Final[dict[int, _Handler]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    **_XID_IN_STREAM,
}


class PgOutputDecoder:
    """Decodes the pgoutput messages of one replication connection, in order.

    One decoder per START_REPLICATION: it tracks the stream-block state across calls.
    A message that fails to decode leaves that state unchanged.
    """

    __slots__ = ("_in_stream", "_proto_version")

    def __init__(self, proto_version: int) -> None:
        if proto_version not in (1, 2):
            raise ProtocolUsageError(
                f"pgoutput proto_version {proto_version} is not supported (use 1 or 2)"
            )
        self._proto_version = proto_version
        self._in_stream = False

    @property
    def proto_version(self) -> int:
        return self._proto_version

    @property
    def in_stream_block(self) -> bool:
        """Between a Stream Start and its Stream Stop."""
        return self._in_stream

    def decode(self, payload: bytes, lsn: Lsn) -> PgOutputMessage:
        """Decode one pgoutput message; `lsn` (the frame's WAL start) is for errors only."""
        insert = self.plain_insert(payload, 0)
        if insert is not None:
            return _fast_insert(insert[0], insert[1])
        try:
            message, end = self._decode_other(payload[0], payload)
            if end != len(payload):
                if end > len(payload):
                    raise _Malformed("message truncated (or a length field is out of range)")
                raise _Malformed(f"{len(payload) - end} trailing bytes after the message")
        except _Malformed as exc:
            raise DecodeError(str(exc), lsn=lsn, tag=_tag_text(payload)) from None
        except (IndexError, struct.error) as exc:
            reason = "message truncated" if payload else "empty message"
            raise DecodeError(reason, lsn=lsn, tag=_tag_text(payload)) from exc
        except ValueError as exc:  # whatever else the stdlib may raise on bad input
            raise DecodeError(f"malformed: {exc}", lsn=lsn, tag=_tag_text(payload)) from exc
        return message

    def plain_insert(self, buf: bytes, pos: int) -> tuple[int, TupleData] | None:
        """The relation OID and new tuple of the Insert message from `buf[pos]` to the end
        of `buf`, read in place (no payload copy, no message object): the hot path.

        Returns None unless the message is an Insert outside a stream block that decodes
        exactly; `decode` must then handle the message, and reject it if it is malformed.
        Never raises, changes no state, so a caller can always fall back to `decode`.
        """
        if self._in_stream:
            return None
        return _plain_insert(buf, pos)

    def _decode_other(self, tag: int, buf: bytes) -> tuple[PgOutputMessage, int]:
        if tag in _STREAM_TAGS:
            return self._stream_control(tag, buf)
        handler = _HANDLERS.get(tag)
        if handler is None:
            raise _Malformed(f"unknown pgoutput message tag {tag:#04x}")
        if self._in_stream and tag in _XID_IN_STREAM:
            (xid,) = _U32.unpack_from(buf, 1)
            return handler(buf, 5, xid)
        return handler(buf, 1, None)

    def _stream_control(self, tag: int, buf: bytes) -> tuple[PgOutputMessage, int]:
        """Stream Start/Stop/Commit/Abort. State changes only after an exact decode."""
        if self._proto_version < 2:
            raise _Malformed(f"stream message {chr(tag)!r} needs proto_version 2 or later")
        if tag == 0x53:  # 'S'
            if self._in_stream:
                raise _Malformed("Stream Start inside a stream block (blocks do not nest)")
            xid, first = _STREAM_START.unpack_from(buf, 1)
            if first > 1:
                raise _Malformed(f"Stream Start: first-segment flag is {first}, not 0 or 1")
            _exact(buf, 6)
            self._in_stream = True
            return StreamStart(xid, first == 1), 6
        if tag == 0x45:  # 'E'
            if not self._in_stream:
                raise _Malformed("Stream Stop without a Stream Start")
            _exact(buf, 1)
            self._in_stream = False
            return StreamStop(), 1
        if self._in_stream:
            raise _Malformed(f"stream message {chr(tag)!r} inside a stream block")
        if tag == 0x63:  # 'c'
            xid, flags, commit_lsn, end_lsn, time_pg = _STREAM_COMMIT.unpack_from(buf, 1)
            commit_at, end_at = _new_lsn(Lsn, commit_lsn), _new_lsn(Lsn, end_lsn)
            time_us = time_pg + PG_EPOCH_OFFSET_US
            return StreamCommit(xid, flags, commit_at, end_at, time_us), 30
        xid, subxid = _STREAM_ABORT.unpack_from(buf, 1)  # 'A'
        return StreamAbort(xid, subxid), 9


def _exact(buf: bytes, size: int) -> None:
    """Stream Start/Stop change decoder state, so they check their length before that."""
    if len(buf) != size:
        raise _Malformed(f"expected {size} bytes, got {len(buf)}")


def _tag_text(payload: bytes) -> str | None:
    if not payload:
        return None
    tag = payload[0]
    return chr(tag) if 0x20 < tag < 0x7F else f"\\x{tag:02x}"


def _plain_insert(buf: bytes, pos: int) -> tuple[int, TupleData] | None:
    """`PgOutputDecoder.plain_insert` outside a stream block: the definition the compiled
    frame loop (`stream._tuples.pump`) is held to. Declines (None) a width whose column
    parser is not compiled yet; `decode` compiles it."""
    try:
        tag, oid, marker, count = _INSERT_HEAD.unpack_from(buf, pos)
        parse = _COMPILED.get(count)
        if parse is None or tag != _INSERT or marker != _NEW:
            return None
        new, end = parse(buf, pos + 8)
    except (IndexError, struct.error, _Malformed):  # the general path reports it
        return None
    if end != len(buf):
        return None
    return oid, new
