"""projections._speedups: the projector's fold of the common row, compiled (optional).

One entry point, the type `Fold`: built once with the Python path's collaborators
(`projections.fastpath.compiled_fold` does), then called once per run of rows. The Python
path (`decode_columns` + `SnapshotStore.apply`) is the definition it is held to.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

_R = TypeVar("_R")

class Fold:
    def __init__(
        self,
        loads: Callable[[bytes], object],
        created_at_us: Callable[[bytes], int | None],
        parse_stamp: Callable[[str], int | None],
        unstamped: int,
        max_stamp_len: int,
        record_state: type,
        *,
        meta_loads: Callable[[bytes], object] | None = None,
    ) -> None: ...
    def __call__(
        self,
        rows: Sequence[tuple[_R, tuple[object, ...]]],
        start: int,
        stop: int,
        indexes_of: Callable[[_R], tuple[int, ...] | None],
        missions: object,
        agents: object,
        changed_missions: list[tuple[str, str]],
        changed_agents: list[tuple[str, str]],
        lsn: object,
        applied_us: int,
        /,
    ) -> tuple[int, int, int, int, int, int]:
        """Fold `rows[start:stop]` (`(relation, values)` pairs) into the state tables
        `missions` and `agents` (`projections.stores.StateTable`) as the Python path would,
        until the first row it declines. Returns `(next, mission_rows, agent_rows,
        invalid_stamps, foreign_rows, new_records)`: `next` is the declined row's position
        (nothing changed for it) or `stop`."""
