"""The projector: committed transactions in, snapshot changes out. Pure (no I/O, no clock).

It owns the applied position. Invariant: a transaction whose commit LSN is strictly below the
end LSN of the last applied transaction has been applied already (the server's own rule: a
commit record may start exactly where the previous transaction ended) and is skipped, so
at-least-once delivery from the slot becomes exactly-once application.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from projections.decode import Rejected, Value, column_indexes, decode_row, wanted
from projections.rows import MISSIONS_TABLE, ChangeRow, JsonValue
from projections.stores import SnapshotStore
from stream.lsn import ZERO, Lsn
from stream.pgoutput import Relation
from stream.transactions import CommittedTransaction

RecordKey = tuple[str, str]


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


class Projector:
    def __init__(
        self,
        *,
        missions: SnapshotStore,
        agents: SnapshotStore,
        applied_lsn: Lsn = ZERO,
        applied_commit_time_us: int | None = None,
    ) -> None:
        self.missions = missions
        self.agents = agents
        self.applied_lsn = applied_lsn
        self.applied_commit_time_us = applied_commit_time_us
        self._relations: dict[int, tuple[Relation, tuple[int, ...] | None]] = {}

    def already_applied(self, tx: CommittedTransaction) -> bool:
        return tx.commit_lsn < self.applied_lsn

    def _indexes(self, relation: Relation) -> tuple[int, ...] | None:
        cached = self._relations.get(relation.oid)
        if cached is not None and cached[0] is relation:
            return cached[1]
        idx = None
        if relation.name == "sync_changes":
            idx = column_indexes(tuple(c.name for c in relation.columns))
        self._relations[relation.oid] = (relation, idx)
        return idx

    def apply_transaction(self, tx: CommittedTransaction) -> Outcome | None:
        """Apply a committed transaction; None when it was applied before (skipped)."""
        if self.already_applied(tx):
            return None
        outcome = Outcome()
        for ins in tx.inserts:
            idx = self._indexes(ins.relation)
            if idx is None:
                outcome.foreign_rows += 1
                continue
            self._apply_values(ins.values, idx, tx.commit_lsn, tx.commit_time_us, outcome)
        self.applied_lsn = tx.end_lsn
        self.applied_commit_time_us = tx.commit_time_us
        return outcome

    def advance(self, lsn: Lsn, commit_time_us: int | None = None) -> None:
        """Move the applied position without data (idle keepalive, load consistent point)."""
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
        """Apply rows read from the table in an exported snapshot (initial load, rebuild)."""
        for values in rows:
            self._apply_values(values, idx, lsn, commit_time_us, outcome)

    def _apply_values(
        self,
        values: tuple[Value, ...],
        idx: tuple[int, ...],
        lsn: Lsn,
        commit_time_us: int,
        outcome: Outcome,
    ) -> None:
        if not wanted(values, idx):
            outcome.foreign_rows += 1
            return
        row = decode_row(values, idx)
        if isinstance(row, Rejected):
            raw: dict[str, JsonValue] = {"columns": row.raw, "detail": row.detail}
            outcome.dead_letters.append(DeadLetter(lsn, row.event_id, row.reason, raw))
            return
        self.apply_row(row, lsn, commit_time_us, outcome)

    def apply_row(self, row: ChangeRow, lsn: Lsn, commit_time_us: int, outcome: Outcome) -> None:
        if row.table_name == MISSIONS_TABLE:
            store, changed = self.missions, outcome.changed_missions
            outcome.mission_rows += 1
        else:
            store, changed = self.agents, outcome.changed_agents
            outcome.agent_rows += 1
        key = (row.user_id, row.record_id)
        result = store.apply(row)
        outcome.invalid_stamps += result.invalid_stamps
        if result.changed:
            state = store.get(row.user_id, row.record_id)
            assert state is not None
            state.last_lsn = lsn
            state.last_applied_us = commit_time_us
            changed.append(key)
        if result.created:
            outcome.new_records += 1
