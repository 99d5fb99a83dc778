"""The projector: committed transactions in, snapshot changes out. Pure (no I/O, no clock).

It owns the applied position. Invariant: a transaction whose commit LSN is strictly below the
end LSN of the last applied transaction has been applied already (the server's own rule: a
commit record may start exactly where the previous transaction ended) and is skipped, so
at-least-once delivery from the slot becomes exactly-once application.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from core.json_types import JsonValue
from core.lsn import ZERO, Lsn
from core.sync_changes import MISSIONS_TABLE
from projections import fastpath
from projections.decode import Picker, Rejected, Value, column_indexes, decode_columns, picker
from projections.stores import SnapshotStore
from stream.messages import Relation
from stream.transactions import CommittedTransaction, RowInsert

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
        fast: bool = True,
    ) -> None:
        """`fast=False` runs the Python path alone (the definition the compiled fast path is
        held to; see projections/fastpath.py)."""
        self.missions = missions
        self.agents = agents
        self.applied_lsn = applied_lsn
        self.applied_commit_time_us = applied_commit_time_us
        # Relation OID -> the Relation last seen, the positions of COLUMNS in its tuples and
        # how to pick them (None: not sync_changes, or it lacks a column we read).
        self._relations: dict[int, tuple[Relation, tuple[int, ...] | None, Picker | None]] = {}
        self._fast = fastpath.APPLY if fast else None
        self._fast_inserts = fastpath.APPLY_INSERTS if fast else None

    def already_applied(self, tx: CommittedTransaction) -> bool:
        return tx.commit_lsn < self.applied_lsn

    def _relation(self, relation: Relation) -> tuple[tuple[int, ...] | None, Picker | None]:
        cached = self._relations.get(relation.oid)
        if cached is not None and cached[0] is relation:
            return cached[1], cached[2]
        idx = pick = None
        if relation.name == "sync_changes":
            idx = column_indexes(tuple(c.name for c in relation.columns))
            if idx is not None:
                pick = picker(idx)
        self._relations[relation.oid] = (relation, idx, pick)
        return idx, pick

    def _picker(self, relation: Relation) -> Picker | None:
        return self._relation(relation)[1]

    def _indexes(self, relation: Relation) -> tuple[int, ...] | None:
        return self._relation(relation)[0]

    def apply_transaction(self, tx: CommittedTransaction) -> Outcome | None:
        """Apply a committed transaction; None when it was applied before (skipped)."""
        if self.already_applied(tx):
            return None
        outcome = Outcome()
        if self._fast_inserts is not None:
            self._apply_inserts_fast(tx.inserts, tx.commit_lsn, tx.commit_time_us, outcome)
        else:
            rows = self._columns_of(tx.inserts, outcome)
            self._apply_columns(rows, tx.commit_lsn, tx.commit_time_us, outcome)
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
        self._apply_columns(map(picker(idx), rows), lsn, commit_time_us, outcome)

    def _columns_of(
        self, inserts: list[RowInsert], outcome: Outcome
    ) -> Iterator[tuple[Value, ...]]:
        """The COLUMNS values of the inserted sync_changes rows; counts the others."""
        relation: Relation | None = None
        pick: Picker | None = None
        for ins in inserts:
            if ins.relation is not relation:
                relation = ins.relation
                pick = self._picker(relation)
            if pick is None:
                outcome.foreign_rows += 1
            else:
                yield pick(ins.values)

    def _apply_inserts_fast(
        self, inserts: list[RowInsert], lsn: Lsn, commit_time_us: int, outcome: Outcome
    ) -> None:
        """`_columns_of` + `_apply_columns`, with the compiled loop taking the rows it can in
        runs and the Python path each row it declines, in order."""
        apply_inserts = self._fast_inserts
        assert apply_inserts is not None
        m_states, m_dirty = self.missions.fast_path_parts()
        a_states, a_dirty = self.agents.fast_path_parts()
        position, end = 0, len(inserts)
        while position < end:
            position, missions, agents, invalid, foreign, new_m, new_a = apply_inserts(
                inserts,
                position,
                self._indexes,
                m_states,
                m_dirty,
                outcome.changed_missions,
                a_states,
                a_dirty,
                outcome.changed_agents,
                lsn,
                commit_time_us,
            )
            outcome.mission_rows += missions
            outcome.agent_rows += agents
            outcome.invalid_stamps += invalid
            outcome.foreign_rows += foreign
            if new_m or new_a:
                self.missions.count_created(new_m)
                self.agents.count_created(new_a)
                outcome.new_records += new_m + new_a
            if position < end:  # declined: a sync_changes row the Python path decides
                ins = inserts[position]
                pick = self._picker(ins.relation)
                assert pick is not None
                self._apply_columns((pick(ins.values),), lsn, commit_time_us, outcome, False)
                position += 1

    def _apply_columns(
        self,
        rows: Iterable[tuple[Value, ...]],
        lsn: Lsn,
        commit_time_us: int,
        outcome: Outcome,
        use_fast: bool = True,
    ) -> None:
        # The hot loop of ingest: every streamed row passes here, so the stores and lists
        # are held in locals. A row's state records the LSN and commit time of the
        # transaction that last changed it (its bookkeeping, set by the store).
        missions, agents = self.missions, self.agents
        changed_missions, changed_agents = outcome.changed_missions, outcome.changed_agents
        fast = self._fast if use_fast else None
        agent_bit, created_bit, shift = fastpath.AGENT, fastpath.CREATED, fastpath.INVALID_SHIFT
        if fast is not None:
            m_states, m_dirty = missions.fast_path_parts()
            a_states, a_dirty = agents.fast_path_parts()
        for columns in rows:
            if fast is not None:
                # The common row, in C; None: declined, nothing changed, the Python path below.
                code = fast(
                    columns,
                    m_states,
                    m_dirty,
                    changed_missions,
                    a_states,
                    a_dirty,
                    changed_agents,
                    lsn,
                    commit_time_us,
                )
                if code is not None:
                    if code & agent_bit:
                        outcome.agent_rows += 1
                    else:
                        outcome.mission_rows += 1
                    if code & created_bit:
                        (agents if code & agent_bit else missions).count_created(1)
                        outcome.new_records += 1
                    if code >> shift:
                        outcome.invalid_stamps += code >> shift
                    continue
            row = decode_columns(columns)
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
