"""In-memory snapshot stores: every mission (or every agent) of every user, merged.

One `SnapshotStore` per kind holds a `RecordState` per `(user_id, record_id)` and the set of
states changed since the persister last took them. Pure and synchronous: the consumer applies
rows, the persister takes the dirty states and writes `to_record`/`keys_to_json` of each; no
locks, because both run on one event loop and neither awaits while touching the store.

Invariants:
- a key is dirty iff its state changed (merge content) since it was last restored or taken;
- `live_count()` equals the number of states whose view is not None, kept incrementally so
  reading it (a metric) costs nothing;
- states handed out (`get`, iteration, `take_dirty`) are the live objects: read or serialise
  them before the next `apply`, never mutate them.

A store keeps its states in a `StateTable`, the one thing it hands out besides states: the
projector gives the two tables to the compiled fold (`projections._speedups.Fold`), which
changes them in place under the table's written contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final, Literal, TypeAlias

from core.json_types import JsonValue
from core.lsn import Lsn
from core.sync_changes import AGENTS_TABLE, APP_ID, MISSIONS_TABLE
from projections.merge import (
    ApplyOutcome,
    RecordState,
    agent_is_live,
    agent_view,
    apply_row,
    merge_into,
    mission_view,
)
from projections.rows import ChangeRow

Kind: TypeAlias = Literal["mission", "agent"]
StoreKey: TypeAlias = tuple[str, str]
"""`(user_id, record_id)`."""

_TABLE_OF: Final[dict[str, str]] = {"mission": MISSIONS_TABLE, "agent": AGENTS_TABLE}


def _mission_is_live(state: RecordState) -> bool:
    return state.exists and not state.deleted


class StateTable:
    """The states of one kind of record: what a `SnapshotStore` keeps, and what the compiled
    fold (`projections._speedups.Fold`) changes in place.

    Its writers are the store's methods and the fold, and each keeps these invariants:
    - `states` maps `(user_id, record_id)` to the one `RecordState` with those ids;
    - `dirty` maps the key of every state whose merge content changed since it was restored
      or last taken to that same state object, in the order of their first change;
    - `live` is the number of states in `states` that have a view of the table's kind
      (`SnapshotStore.is_live`);
    - the two dicts are never replaced (cleared in place), so a reference to them stays
      valid; a writer that changes a state's merge content sets its `last_lsn` and
      `last_applied_us` when it is given them.
    The fold adds only what keeps them simply: it creates new states (live ones), and
    changes only states that exist, are not deleted and whose liveness the row cannot change
    (it declines a row of an agent that sets `deletedAt`).
    """

    __slots__ = ("dirty", "live", "states")

    def __init__(self) -> None:
        self.states: dict[StoreKey, RecordState] = {}
        # A dict, not a set: insertion-ordered, so take_dirty() is deterministic.
        self.dirty: dict[StoreKey, RecordState] = {}
        self.live = 0


class SnapshotStore:
    """The merged states of one kind of record, with dirty tracking for the persister."""

    __slots__ = (
        "_dirty",
        "_is_live",
        "_live_beyond_flags",
        "_states",
        "_table",
        "_view",
        "kind",
        "table_name",
    )

    def __init__(self, kind: Kind) -> None:
        if kind not in _TABLE_OF:
            raise ValueError(f"unknown snapshot kind {kind!r} (expected 'mission' or 'agent')")
        self.kind: Final = kind
        self.table_name: Final = _TABLE_OF[kind]
        self._table: Final = StateTable()
        # The table's dicts, held directly for the per-row paths (never replaced, see there).
        self._states: Final = self._table.states
        self._dirty: Final = self._table.dirty
        self._is_live: Callable[[RecordState], bool] = (
            _mission_is_live if kind == "mission" else agent_is_live
        )
        # `apply` runs per streamed row: it tests the flags every kind's liveness needs
        # itself, and calls out only for what a kind adds (agents: `deletedAt`).
        self._live_beyond_flags: Callable[[RecordState], bool] | None = (
            None if kind == "mission" else agent_is_live
        )
        self._view: Callable[[RecordState], dict[str, JsonValue] | None] = (
            mission_view if kind == "mission" else agent_view
        )

    # --- writes ---------------------------------------------------------------------------

    def apply(
        self, row: ChangeRow, lsn: Lsn | None = None, applied_us: int | None = None
    ) -> ApplyOutcome:
        """Fold one row into its record's state, creating the state on first sight.

        When the state changes and `lsn` is given, its bookkeeping becomes `lsn` and
        `applied_us` (the transaction that changed it last). Raises ValueError for a row of
        another table: routing rows is the caller's job.
        """
        if row.table_name != self.table_name or row.app_id != APP_ID:
            raise ValueError(
                f"{self.kind} store got a row of {row.app_id}/{row.table_name} "
                f"(event {row.event_id})"
            )
        key = (row.user_id, row.record_id)
        state = self._states.get(key)
        beyond_flags = self._live_beyond_flags
        if state is None:
            state = RecordState(row.user_id, row.record_id)
            self._states[key] = state
            was_live = False
        else:
            was_live = (
                state.exists and not state.deleted and (beyond_flags is None or beyond_flags(state))
            )
        outcome = apply_row(state, row)
        if outcome.changed:
            self._dirty[key] = state
            is_live = (
                state.exists and not state.deleted and (beyond_flags is None or beyond_flags(state))
            )
            self._table.live += is_live - was_live
            if lsn is not None:
                state.last_lsn = lsn
                state.last_applied_us = applied_us
        return outcome

    @property
    def table(self) -> StateTable:
        """The states, dirty set and live count, for the compiled fold (see `StateTable`)."""
        return self._table

    def restore(self, states: Iterable[RecordState]) -> int:
        """Load persisted states (taking ownership); returns how many were read.

        A restored state is clean, since it is what the database holds. If the store already
        has the key (rows applied before the load finished), the two are joined, and the
        result is dirty only if the database copy lacked something.
        """
        count = 0
        for loaded in states:
            count += 1
            key = (loaded.user_id, loaded.record_id)
            current = self._states.get(key)
            if current is not None:
                self._table.live -= self._is_live(current)
                self._dirty.pop(key, None)
                if merge_into(loaded, current):
                    self._dirty[key] = loaded
            self._states[key] = loaded
            self._table.live += self._is_live(loaded)
        return count

    def clear(self) -> None:
        """Forget every state (a rebuild starts from nothing)."""
        self._states.clear()
        self._dirty.clear()
        self._table.live = 0

    def take_dirty(self) -> list[RecordState]:
        """The states changed since the last call, oldest change first; clears the set."""
        dirty = list(self._dirty.values())
        self._dirty.clear()
        return dirty

    # --- reads ----------------------------------------------------------------------------

    def get(self, user_id: str, record_id: str) -> RecordState | None:
        return self._states.get((user_id, record_id))

    def view(self, user_id: str, record_id: str) -> dict[str, JsonValue] | None:
        """The record as the planner sees it (`mission_view`/`agent_view`), or None."""
        state = self._states.get((user_id, record_id))
        return None if state is None else self._view(state)

    def is_live(self, state: RecordState) -> bool:
        """Whether `state` has a view of this kind."""
        return self._is_live(state)

    def live_count(self) -> int:
        """How many states have a view (existing, not deleted; agents: no `deletedAt`)."""
        return self._table.live

    def dirty_count(self) -> int:
        return len(self._dirty)

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def __iter__(self) -> Iterator[RecordState]:
        return iter(self._states.values())

    def __repr__(self) -> str:
        return (
            f"SnapshotStore({self.kind!r}, states={len(self._states)}, live={self._table.live}, "
            f"dirty={len(self._dirty)})"
        )
