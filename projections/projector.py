"""The projector: committed transactions in, snapshot changes out. Pure (no I/O, no clock).

It owns the applied position. Invariant: a transaction whose commit LSN is strictly below the
end LSN of the last applied transaction has been applied already (the server's own rule: a
commit record may start exactly where the previous transaction ended) and is skipped, so
at-least-once delivery from the slot becomes exactly-once application.

What it takes in is described here as protocols (`Transaction`, `InsertedRow`,
`RelationShape`), which the replication stream's types (`CommittedTransaction`, `RowInsert`,
`Relation`) satisfy structurally: the projections import nothing of the stream, and mypy
checks the fit where the composition root hands one to the other.

A transaction can be applied whole (`apply_transaction`) or in bounded steps (`start`, then
`Applying.step` until it returns True), so that a caller on an event loop can yield between
steps. Invariant: the applied position moves only when the last step finishes. Between steps
the stores already hold part of the transaction; a checkpoint persisted then is still the
position before it, so after a restart the whole transaction comes again, and its rows merge
into what was persisted without changing it (the merge is a join: a replayed row changes
nothing). One transaction is in progress at a time.

Rows go through the compiled fold (`projections._speedups`, see `projections.fastpath`) when
it is built and the projector was made with `compiled=True` (the default); the fold stops at
every row it does not take, and the Python path (`decode_columns` + `SnapshotStore.apply`,
the definition) applies that row, so both give the same snapshots and outcomes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias, TypeVar

from core.json_types import JsonValue
from core.lsn import ZERO, Lsn
from core.sync_changes import MISSIONS_TABLE
from projections import fastpath
from projections.decode import Picker, Rejected, Value, column_indexes, decode_columns, picker
from projections.stores import SnapshotStore

RecordKey = tuple[str, str]


class ColumnShape(Protocol):
    """A column of a relation, as far as the projector reads it."""

    @property
    def name(self) -> str: ...


class RelationShape(Protocol):
    """A table's shape as the stream last described it (`stream.messages.Relation`): rows of
    a relation named `sync_changes` that has every column the projections read are applied,
    all others counted as foreign. A later description of the same `oid` replaces it."""

    @property
    def oid(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def columns(self) -> Sequence[ColumnShape]: ...


InsertedRow: TypeAlias = tuple[RelationShape, tuple[Value, ...]]
"""An inserted row: its relation and its values in that relation's column order
(`stream.transactions.RowInsert`)."""


class Transaction(Protocol):
    """A committed transaction (`stream.transactions.CommittedTransaction`): `commit_lsn`
    where its commit record starts, `end_lsn` where it ends (the position that becomes
    applied), its commit time and its inserted rows in commit order."""

    @property
    def commit_lsn(self) -> Lsn: ...

    @property
    def end_lsn(self) -> Lsn: ...

    @property
    def commit_time_us(self) -> int: ...

    @property
    def inserts(self) -> Sequence[InsertedRow]: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    lsn: Lsn
    event_id: str | None
    reason: str
    raw: dict[str, JsonValue]


@dataclass(slots=True)
class Outcome:
    """What one transaction (or one load) did to the snapshots."""

    mission_rows: int = 0
    agent_rows: int = 0
    foreign_rows: int = 0
    invalid_stamps: int = 0
    new_records: int = 0
    changed_missions: list[RecordKey] = field(default_factory=list)
    changed_agents: list[RecordKey] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.mission_rows + self.agent_rows


_R = TypeVar("_R")
_LOADED: Final = object()  # what a row read from the table carries in place of a relation
_UNSEEN: Final = object()  # no row carries it


class Applying:
    """One committed transaction being applied in bounded steps (see `Projector.start`)."""

    __slots__ = ("_next", "_projector", "_tx", "done", "outcome")

    def __init__(self, projector: Projector, tx: Transaction) -> None:
        self._projector = projector
        self._tx = tx
        self._next = 0  # the position of the first insert not applied yet
        self.done = False
        self.outcome: Final = Outcome()
        """What the steps so far did; complete once `done`."""

    @property
    def rows_left(self) -> int:
        """Inserted rows (of every relation) not applied yet."""
        return len(self._tx.inserts) - self._next

    def step(self, max_rows: int) -> bool:
        """Apply up to `max_rows` (>= 1) more inserted rows, foreign ones included; True once
        the whole transaction is applied, and the applied position is then its end. Calling
        it again after that does nothing and returns True."""
        if self.done:
            return True
        if max_rows < 1:
            raise ValueError(f"a step applies at least one row, not {max_rows}")
        tx, p = self._tx, self._projector
        inserts = tx.inserts
        stop = min(len(inserts), self._next + max_rows)
        p._apply_rows(inserts, self._next, stop, p._indexes, tx.commit_lsn, tx.commit_time_us,
                      self.outcome)  # fmt: skip
        self._next = stop
        if stop < len(inserts):
            return False
        self.done = True
        p._finish(self, tx)
        return True


class Projector:
    def __init__(
        self,
        *,
        missions: SnapshotStore,
        agents: SnapshotStore,
        applied_lsn: Lsn = ZERO,
        applied_commit_time_us: int | None = None,
        compiled: bool = True,
    ) -> None:
        """`compiled`: fold the common row with the compiled `projections._speedups` when it
        is built (the default); False runs the Python path alone, the definition the compiled
        fold is held to (same snapshots and outcomes, lower throughput)."""
        self.missions = missions
        self.agents = agents
        self.applied_lsn = applied_lsn
        self.applied_commit_time_us = applied_commit_time_us
        # Relation OID -> the relation last seen, the positions of COLUMNS in its tuples and
        # how to pick them (None: not sync_changes, or it lacks a column we read).
        self._relations: dict[int, tuple[RelationShape, tuple[int, ...] | None]] = {}
        self._pickers: dict[tuple[int, ...], Picker] = {}
        self._fold = fastpath.compiled_fold() if compiled else None
        self._applying: Applying | None = None

    @property
    def compiled(self) -> bool:
        """Rows go through the compiled fold (asked for, and built)."""
        return self._fold is not None

    def already_applied(self, tx: Transaction) -> bool:
        return tx.commit_lsn < self.applied_lsn

    def start(self, tx: Transaction) -> Applying | None:
        """Begin applying a committed transaction in steps; None when it was applied before
        (skipped, as by `apply_transaction`). Raises RuntimeError while another one started
        here is not done."""
        self._check_idle()
        if self.already_applied(tx):
            return None
        applying = self._applying = Applying(self, tx)
        return applying

    def apply_transaction(self, tx: Transaction) -> Outcome | None:
        """Apply a committed transaction whole; None when it was applied before (skipped)."""
        applying = self.start(tx)
        if applying is None:
            return None
        applying.step(max(1, applying.rows_left))
        return applying.outcome

    def advance(self, lsn: Lsn, commit_time_us: int | None = None) -> None:
        """Move the applied position without data (idle keepalive, load consistent point)."""
        self._check_idle()
        if lsn > self.applied_lsn:
            self.applied_lsn = lsn
            if commit_time_us is not None:
                self.applied_commit_time_us = commit_time_us

    def apply_loaded(
        self,
        rows: Iterable[tuple[Value, ...]],
        idx: tuple[int, ...],
        lsn: Lsn,
        commit_time_us: int,
        outcome: Outcome,
    ) -> None:
        """Apply rows read from the table in an exported snapshot (initial load, rebuild);
        `idx` gives the positions of COLUMNS in each row."""
        picker(idx)  # checks idx
        loaded = [(_LOADED, values) for values in rows]
        self._apply_rows(loaded, 0, len(loaded), lambda _: idx, lsn, commit_time_us, outcome)

    def _check_idle(self) -> None:
        if self._applying is not None and not self._applying.done:
            raise RuntimeError("a transaction is being applied in steps; finish it first")

    def _finish(self, applying: Applying, tx: Transaction) -> None:
        if applying is self._applying:
            self._applying = None
        self.applied_lsn = tx.end_lsn
        self.applied_commit_time_us = tx.commit_time_us

    def _indexes(self, relation: RelationShape) -> tuple[int, ...] | None:
        """The positions of COLUMNS in the relation's tuples; None for any other relation."""
        cached = self._relations.get(relation.oid)
        if cached is not None and cached[0] is relation:
            return cached[1]
        idx = None
        if relation.name == "sync_changes":
            idx = column_indexes(tuple(c.name for c in relation.columns))
        self._relations[relation.oid] = (relation, idx)
        return idx

    def _picker(self, idx: tuple[int, ...]) -> Picker:
        pick = self._pickers.get(idx)
        if pick is None:
            pick = self._pickers[idx] = picker(idx)
        return pick

    def _apply_rows(
        self,
        rows: Sequence[tuple[_R, tuple[Value, ...]]],
        start: int,
        stop: int,
        indexes_of: Callable[[_R], tuple[int, ...] | None],
        lsn: Lsn,
        commit_time_us: int,
        outcome: Outcome,
    ) -> None:
        """Apply `rows[start:stop]` in order: the compiled fold takes the rows it can in runs,
        the Python path each row it declines."""
        fold = self._fold
        if fold is None:
            self._apply_python(rows, start, stop, indexes_of, lsn, commit_time_us, outcome)
            return
        missions, agents = self.missions.table, self.agents.table
        changed_missions, changed_agents = outcome.changed_missions, outcome.changed_agents
        position = start
        while position < stop:
            position, mission_rows, agent_rows, invalid, foreign, created = fold(
                rows, position, stop, indexes_of, missions, agents,
                changed_missions, changed_agents, lsn, commit_time_us,
            )  # fmt: skip
            outcome.mission_rows += mission_rows
            outcome.agent_rows += agent_rows
            outcome.invalid_stamps += invalid
            outcome.foreign_rows += foreign
            outcome.new_records += created
            if position < stop:  # declined: a sync_changes row the Python path decides
                self._apply_python(rows, position, position + 1, indexes_of, lsn,
                                   commit_time_us, outcome)  # fmt: skip
                position += 1

    def _apply_python(
        self,
        rows: Sequence[tuple[_R, tuple[Value, ...]]],
        start: int,
        stop: int,
        indexes_of: Callable[[_R], tuple[int, ...] | None],
        lsn: Lsn,
        commit_time_us: int,
        outcome: Outcome,
    ) -> None:
        # The hot loop of ingest without the compiled fold: the stores and lists are held in
        # locals. A row's state records the LSN and commit time of the transaction that last
        # changed it (its bookkeeping, set by the store).
        missions, agents = self.missions, self.agents
        changed_missions, changed_agents = outcome.changed_missions, outcome.changed_agents
        relation: object = _UNSEEN  # the key `pick` belongs to
        pick: Picker | None = None
        for key, values in rows[start:stop] if start or stop < len(rows) else rows:
            if key is not relation:
                relation = key
                idx = indexes_of(key)
                pick = None if idx is None else self._picker(idx)
            if pick is None:
                outcome.foreign_rows += 1
                continue
            row = decode_columns(pick(values))
            if row is None:
                outcome.foreign_rows += 1
                continue
            if isinstance(row, Rejected):
                raw: dict[str, JsonValue] = {"columns": row.raw, "detail": row.detail}
                outcome.dead_letters.append(DeadLetter(lsn, row.event_id, row.reason, raw))
                continue
            if row.table_name == MISSIONS_TABLE:
                result = missions.apply(row, lsn, commit_time_us)
                outcome.mission_rows += 1
                if result.changed:
                    changed_missions.append((row.user_id, row.record_id))
            else:
                result = agents.apply(row, lsn, commit_time_us)
                outcome.agent_rows += 1
                if result.changed:
                    changed_agents.append((row.user_id, row.record_id))
            if result.invalid_stamps:
                outcome.invalid_stamps += result.invalid_stamps
            if result.created:
                outcome.new_records += 1
