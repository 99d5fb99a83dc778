from collections.abc import Callable
from typing import Any

from stream.messages import Relation, TupleData, Unchanged

def plain_insert(unchanged: Unchanged, buf: bytes, pos: int, /) -> tuple[int, TupleData] | None: ...
def insert_frame(
    unchanged: Unchanged,
    buf: bytes,
    relations: dict[int, Relation],
    inserts: list[Any],
    row_insert: type,
    /,
) -> int | None: ...
def insert_frames(
    get_copy_data: Callable[[bool], tuple[int, Any]],
    limit: int,
    unchanged: Unchanged,
    relations: dict[int, Relation],
    inserts: list[Any] | None,
    row_insert: type,
    /,
) -> tuple[int, int, int, bytes | int | None]: ...
