"""The projector's compiled fast path, when it was built.

`projections._speedups.apply` folds the common row (an `insert`/`update` of a new or an
existing, not deleted `ai` mission or agent, well-formed) into the stores in C, calling the
same parsers as the Python path; for any other row it declines and changes nothing, and the
Python path (`decode_columns` + `SnapshotStore.apply`) takes the row. The Python path is
the definition: `tests/unit/test_fastpath.py` holds the compiled one to it.

The module is optional (see stream/speedups.py). `APPLY` is None without it, or when
`MISSION_RUNNER_PURE_PYTHON=1` is set, and the projector then runs the Python path alone:
same snapshots, lower throughput.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import orjson

from core import instants
from projections import decode, merge
from stream.speedups import pure_python
from stream.transactions import RowInsert

FastApply = Callable[..., int | None]
FastApplyInserts = Callable[..., tuple[int, int, int, int, int, int, int]]

AGENT: Final = 2
CREATED: Final = 4
INVALID_SHIFT: Final = 3


def _load() -> tuple[FastApply, FastApplyInserts] | None:
    if pure_python():
        return None
    try:
        from projections import _speedups
    except ImportError:
        return None
    _speedups.configure(
        orjson.loads,
        decode._created_at_us,
        instants.parse_stamp_text,
        merge.UNSTAMPED,
        instants.MAX_STAMP_LEN,
        merge.RecordState,
        RowInsert,
    )
    return _speedups.apply, _speedups.apply_inserts


_LOADED: Final = _load()

APPLY: Final[FastApply | None] = _LOADED[0] if _LOADED else None
"""`apply(columns, mission_states, mission_dirty, changed_missions, agent_states,
agent_dirty, changed_agents, lsn, applied_us)`: None (declined, nothing changed) or an int
of bits (1: the record changed, AGENT: an agent row, CREATED: the row created the record, a
live one the caller adds to its store's count) and the invalid-stamp count shifted by
INVALID_SHIFT."""

APPLY_INSERTS: Final[FastApplyInserts | None] = _LOADED[1] if _LOADED else None
"""`apply_inserts(inserts, start, indexes_of, <the six store arguments of APPLY>, lsn,
applied_us)`: APPLY over a transaction's RowInserts from `start` on, stopping at the first
row it declines; returns `(next, mission_rows, agent_rows, invalid_stamps, foreign_rows,
new_missions, new_agents)`, `next` being the declined row's position (or the end)."""
