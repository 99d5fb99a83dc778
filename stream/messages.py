"""The pgoutput messages, as frozen values (PostgreSQL docs, "Logical Replication Message
Formats"), protocol versions 1 and 2.

`stream.pgoutput` decodes them; the transaction assembler and everything downstream
consume them. Values keep the protocol's shape: LSNs as `Lsn`, times as µs since the Unix
epoch, column values as the bytes the server sent (see `TupleData`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from core.lsn import Lsn


class Unchanged(enum.Enum):
    """Marks a column the server did not send: an unchanged TOASTed value ('u')."""

    TOAST = "u"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.TOAST

TupleData: TypeAlias = tuple[bytes | Unchanged | None, ...]
"""Column values in relation column order: the text ('t') or binary ('b') bytes as sent,
None for NULL ('n'), `UNCHANGED` for an unchanged TOASTed value ('u')."""


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: Lsn
    commit_time_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    """The transaction was replayed from `name`; `commit_lsn` is its LSN there (0 when
    sent at the start of a streamed transaction, whose commit is not yet known)."""

    commit_lsn: Lsn
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Part of the replica identity (flag bit 1)."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's shape. Changes refer to it by `oid`; a later Relation replaces it.

    `replica_identity` is pg_class.relreplident: 'd' default, 'n' nothing, 'f' full,
    'i' index. Columns exclude generated columns, in the order tuple values arrive.
    """

    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {c.name: i for i, c in enumerate(self.columns)})

    @property
    def key_flags(self) -> tuple[bool, ...]:
        """Per column: is it part of the replica identity key?"""
        return tuple(c.is_key for c in self.columns)

    def column_index(self, name: str) -> int:
        """Position of column `name` in this relation's tuples; KeyError if absent."""
        try:
            return self._index[name]
        except KeyError:
            where = f"{self.namespace}.{self.name}"
            raise KeyError(f"relation {where} has no column {name!r}") from None


@dataclass(frozen=True, slots=True)
class Type:
    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    xid: int | None
    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """`old_kind` is 'K' (old key columns, others None), 'O' (whole old row, REPLICA
    IDENTITY FULL) or None (no old values sent: the key did not change)."""

    xid: int | None
    relation_oid: int
    old_kind: str | None
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    xid: int | None
    relation_oid: int
    old_kind: str
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    xid: int | None
    options: int
    relation_oids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A `pg_logical_emit_message` record. Non-transactional ones arrive outside any
    transaction, as soon as they are decoded, whatever becomes of their transaction."""

    xid: int | None
    transactional: bool
    lsn: Lsn
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Opens a block of changes of in-progress transaction `xid` (top-level xid)."""

    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """Closes the current stream block."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """Discard streamed transaction `xid` (when `subxid == xid`) or only the changes of
    its subtransaction `subxid`."""

    xid: int
    subxid: int


PgOutputMessage: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)
