"""stream._tuples: the consumer's frame loop for plain Inserts, compiled (optional).

One entry point, `pump`; `TransactionAssembler.add_insert_frames` is its only caller. The
Python fused path (`PgOutputDecoder.plain_insert` + `TransactionAssembler.add_insert`) is the
definition it is held to.
"""

from collections.abc import Callable
from typing import Any

from stream.messages import Relation, TupleData, Unchanged

def pump(
    get_copy_data: Callable[[bool], tuple[int, Any]],
    limit: int,
    unchanged: Unchanged,
    relations: dict[int, Relation],
    inserts: list[tuple[Relation, TupleData]] | None,
    /,
) -> tuple[int, int, int, bytes | int | None]:
    """Read frames with `get_copy_data(True)` and take, up to `limit` of them, each XLogData
    frame carrying exactly one well-formed Insert of a relation in `relations`: append
    `(relation, values)` to `inserts` (None: take no frame; the caller keeps a plain
    transaction open whenever it passes a list). Returns the frames taken, their bytes,
    their highest WAL end (0 if none) and the rest: the first frame not taken, as bytes;
    get_copy_data's size when it had no frame (<= 0); None after `limit` frames. Never raises
    for bad input; an error of `get_copy_data` after frames were taken comes out of the next
    call."""
