"""Replication frames in, committed transactions out: the consumer's sans-IO data path.

`FrameReader` chains the frame codec (`stream.frames`), the pgoutput decoder and the
transaction assembler of one START_REPLICATION stream. `feed` takes each CopyData payload
in order and returns what the consumer has to act on: a committed transaction, a
non-transactional logical message, a keepalive, or nothing yet. Strictness is theirs: a
frame or message that does not decode exactly raises `DecodeError` with its LSN and tag.

An Insert inside a plain transaction is nearly every frame of a busy stream, so its path is
fused: the message is read in place from the frame and its tuple goes straight to the
assembler, with no XLogData, payload copy or Insert object on the way. Invariant: that path
is taken only when the decoder and the assembler each confirm the message is ordinary
(`PgOutputDecoder.plain_insert`, `TransactionAssembler.add_insert`, both free of side
effects when they decline); everything else, malformed input included, goes through the
general path, which reads the same bytes again and raises. Both paths therefore give the
same results and the same errors, which the unit tests check on captured streams.

`pump` is the consumer's way in: it reads frames from the connection (psycopg's
`get_copy_data`) and takes each run of plain Inserts with the compiled frame loop
(`stream._tuples.pump`), with no Python step per frame, handing back the first frame it does
not take for `feed`. Whether the compiled loop is used is the constructor's `compiled`
argument (`StreamOptions.compiled` in the consumer); without it, or in a build without the
module, `pump` hands back each frame as it comes, and `feed` takes it on the Python fused
path: same results, lower throughput.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeAlias

from core.lsn import Lsn
from stream.frames import (
    XLOG_PAYLOAD_AT,
    PrimaryKeepalive,
    XLogData,
    parse_frame,
    xlog_wal_end,
)
from stream.messages import LogicalMessage, Relation
from stream.pgoutput import PgOutputDecoder
from stream.transactions import (
    CommittedTransaction,
    GetCopyData,
    TransactionAssembler,
)

_TAG_XLOG: Final = 0x77  # 'w'
_TAG_INSERT: Final = 0x49  # 'I', the first byte of the pgoutput message
_MIN_INSERT_FRAME: Final = XLOG_PAYLOAD_AT + 8  # frame header, Insert header

ReaderOutput: TypeAlias = CommittedTransaction | LogicalMessage | PrimaryKeepalive | None


class FrameReader:
    """Decodes the frames of one replication connection, in order (one per stream)."""

    __slots__ = ("_assembler", "_decoder", "_received")

    def __init__(self, proto_version: int, *, compiled: bool = True) -> None:
        """`compiled`: `pump` takes runs of plain Inserts with the compiled frame loop when it
        is built (the default); False keeps to the Python paths (same results, slower)."""
        self._decoder = PgOutputDecoder(proto_version)
        self._assembler = TransactionAssembler(compiled=compiled)
        self._received = 0  # the highest WAL end of any frame so far

    @property
    def received_lsn(self) -> Lsn:
        """The highest WAL end any frame (data or keepalive) has reported; 0 before any."""
        return Lsn(self._received)

    @property
    def in_transaction(self) -> bool:
        """Something received still waits for its transaction's outcome (see
        `TransactionAssembler.in_transaction`)."""
        return self._assembler.in_transaction

    @property
    def buffered_rows(self) -> int:
        return self._assembler.buffered_rows

    @property
    def relations(self) -> Mapping[int, Relation]:
        return self._assembler.relations

    @property
    def compiled(self) -> bool:
        """`pump` uses the compiled frame loop (asked for, and built)."""
        return self._assembler.pumps

    def feed(self, buf: bytes) -> ReaderOutput:
        """Take the next CopyData payload; returns a transaction at its commit, a
        non-transactional message or a keepalive at once, and None for everything else."""
        if (
            len(buf) > _MIN_INSERT_FRAME
            and buf[0] == _TAG_XLOG
            and buf[XLOG_PAYLOAD_AT] == _TAG_INSERT
        ):
            insert = self._decoder.plain_insert(buf, XLOG_PAYLOAD_AT)
            if insert is not None and self._assembler.add_insert(insert[0], insert[1]):
                end = xlog_wal_end(buf)
                if end > self._received:
                    self._received = end
                return None
        return self._general(buf)

    def pump(self, get_copy_data: GetCopyData, limit: int) -> tuple[int, int, bytes | int | None]:
        """Read frames with `get_copy_data` (psycopg's `PGconn.get_copy_data`, the caller's
        connection) and take, up to `limit` of them, the plain Inserts `feed` would take on
        its fused path, all in C. Returns the frames taken, their bytes, and the rest: the
        first frame not taken, as bytes, which the caller passes to `feed`; get_copy_data's
        size when it had no frame (0: none buffered, -1: the copy ended); None after
        `limit` frames. Without the compiled frame loop it reads one frame and returns it as
        the rest; while a stream block is open (whose Inserts are never fused) the compiled
        loop does the same."""
        if self._assembler.pumps:
            taken, taken_bytes, end, rest = self._assembler.add_insert_frames(
                get_copy_data, limit, takes_inserts=not self._decoder.in_stream_block
            )
            if end > self._received:
                self._received = end
            return taken, taken_bytes, rest
        size, data = get_copy_data(True)
        return 0, 0, (size if size <= 0 else bytes(data))

    def _general(self, buf: bytes) -> ReaderOutput:
        frame = parse_frame(buf)
        if frame.wal_end > self._received:
            self._received = frame.wal_end
        if type(frame) is XLogData:
            message = self._decoder.decode(frame.payload, frame.wal_start)
            return self._assembler.feed(message, frame.wal_start)
        assert type(frame) is PrimaryKeepalive
        return frame
