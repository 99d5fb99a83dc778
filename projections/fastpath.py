"""The projector's compiled fold, when it was built.

`projections._speedups.Fold` folds the common row (an `insert`/`update` of a new or an
existing, not deleted `ai` mission or agent, well-formed) into the state tables in C,
calling the same parsers as the Python path; at any other row it stops, having changed
nothing for it, and the Python path (`decode_columns` + `SnapshotStore.apply`) takes the row.
The Python path is the definition: `tests/unit/test_fastpath.py` holds the compiled one to it.

The module is optional: without it `compiled_fold` returns None and the projector runs the
Python path alone (same snapshots, lower throughput), as it does when built with
`compiled=False`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import orjson

from core import instants
from core.lsn import Lsn
from projections import decode, merge
from projections.decode import Value
from projections.stores import StateTable

R = TypeVar("R")
"""What a fold's rows carry beside their values: whatever `indexes_of` reads (a stream
relation, or a marker for rows loaded from the table)."""


class Fold(Protocol):
    """`projections._speedups.Fold`, as the projector calls it (see its `.pyi`)."""

    def __call__(
        self,
        rows: Sequence[tuple[R, tuple[Value, ...]]],
        start: int,
        stop: int,
        indexes_of: Callable[[R], tuple[int, ...] | None],
        missions: StateTable,
        agents: StateTable,
        changed_missions: list[tuple[str, str]],
        changed_agents: list[tuple[str, str]],
        lsn: Lsn,
        applied_us: int,
        /,
    ) -> tuple[int, int, int, int, int, int]: ...


def compiled_fold(*, meta_loads: Callable[[bytes], object] | None = None) -> Fold | None:
    """A new compiled fold over the Python path's own collaborators (its memos are its own);
    None when `projections._speedups` was not built. `meta_loads` replaces the fold's
    in-place scanner of `field_meta` (for measuring one against the other; see the Fold's
    docstring)."""
    try:
        from projections._speedups import Fold as CompiledFold
    except ImportError:
        return None
    fold: Fold = CompiledFold(
        loads=orjson.loads,
        created_at_us=decode._created_at_us,
        parse_stamp=instants.parse_stamp_text,
        unstamped=merge.UNSTAMPED,
        max_stamp_len=instants.MAX_STAMP_LEN,
        record_state=merge.RecordState,
        meta_loads=meta_loads,
    )
    return fold
