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
