"""The last-writer-wins merge of `sync_changes` rows into one record (domain.md §2).

Pure: no I/O, no clock, no logging. One `RecordState` per `(user_id, table, record_id)` holds,
for every field, the winning value and its merge key `(stamp_us, created_at_us, event_id)`,
encoded as one `bytes` (see `make_key`).
Because the winner of each field is the maximum of a total order over candidates, and the
record flags only ever go from False to True, the merge is a join (semilattice): the result
does not depend on row order, replaying a row changes nothing, and two partial states join
into the state of all their rows (`merge_states`).

Stamps are parsed to instants (`core.instants.parse_stamp`, domain.md §2, Decision: compare
instants, not text); a stamp that is not a valid instant falls back to the row's `created_at`
and is counted.

Decisions where the domain left room:
- A delete row's `data` (`{deletedAt}` or `{}`) is never a candidate value (§2 lists only
  non-delete rows). A tombstone drops every value and key: nothing may read them (the record
  does not exist any more) and a tombstone is then tiny. A mission's `deletedAt` that the web
  app sets with an *update* (a soft delete) is an ordinary field and stays in the snapshot.
- An `update` field without any `field_meta` entry counts as an invalid stamp (created_at is
  used); only `insert` rows have unstamped fields.
- The fields `id` and `__fieldMeta` of a row's `data` are ignored: `to_record` writes both.
- `to_record` reports an unstamped winner's stamp as its row's `created_at`.
- An agent's merged `deletedAt` counts as set by JS truthiness (what the web app tests):
  null, false, 0 and "" keep the agent; any other value, even `[]` or `{}`, drops it.
- `ApplyOutcome.changed` is True when anything the persisted form holds changed, merge keys
  included: a key can change without a visible change (same stamp, later created_at), and not
  persisting it would let a reloaded state merge differently from the in-memory one.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from core.instants import MAX_STAMP_LEN, format_stamp, parse_stamp_text
from core.json_types import JsonValue
from core.lsn import Lsn
from core.sync_changes import OP_DELETE, OP_INSERT
from projections.rows import ChangeRow

FieldKey: TypeAlias = bytes
"""`(stamp_us, created_at_us, event_id)` encoded by `make_key`: the greatest key of a field
wins; bytes order is the triple's order."""

UNSTAMPED: Final = -(1 << 62)
"""Stamp of an insert field without a `field_meta` entry: below every real instant (the
earliest parseable stamp is about -6.2e16 µs, PostgreSQL's earliest timestamp about -2.1e17)."""

_BIAS: Final = 1 << 63  # a signed 64-bit int plus _BIAS, big-endian: bytes order is int order
_PACK: Final = struct.Struct(">QQ").pack
_UNPACK: Final = struct.Struct(">QQ").unpack_from
_UNSTAMPED_BIASED: Final = UNSTAMPED + _BIAS

RESERVED_FIELDS: Final = frozenset(("id", "__fieldMeta"))
"""Fields of `data` that are not merged: `to_record` derives them."""

# --- merge keys --------------------------------------------------------------------------
#
# A key is one immutable `bytes`:
#   bytes 0..7   stamp_us + 2**63, big-endian (UNSTAMPED included)
#   bytes 8..15  created_at_us + 2**63, big-endian
#   bytes 16..   the event id as UTF-8 (`surrogatepass`, so every str encodes, and back)
# Biased big-endian integers compare as the signed ones do, and UTF-8 compares as code points
# do, so bytes order is exactly the order of the `(stamp, created, event_id)` triples, for any
# event ids. The encoding is injective and depends on the triple alone: a reloaded key is the
# same bytes as the one `apply_row` built.
# With a canonical UUID id a key is 52 bytes, one 96-byte block (`sys.getsizeof` 85); a tuple
# key took four blocks: the tuple, two ints and the 36-character id, 224 bytes. Storing a
# canonical UUID as its 16 raw bytes would make it one 80-byte block, but recognising
# canonical text exactly and converting it costs about 0.45 µs per row on the merge's hot
# path (five C calls), against about 0.05 µs for `encode`.
# Stamps and created times must fit a signed 64-bit int (else `struct.error`): parsed
# instants and `created_at` (read via datetime) always do; `state_from_persisted` turns an
# out-of-range persisted one into ValueError.


def make_key(stamp: int, created: int, event_id: str) -> FieldKey:
    """The merge key of `(stamp, created, event_id)`; `stamp` is µs since the epoch or
    `UNSTAMPED`, `created` µs since the epoch, both within a signed 64-bit int."""
    return _PACK(stamp + _BIAS, created + _BIAS) + event_id.encode("utf-8", "surrogatepass")


def key_stamp(key: FieldKey) -> int:
    """The stamp of a key (µs since the epoch, or `UNSTAMPED`)."""
    biased: int = _UNPACK(key)[0]
    return biased - _BIAS


def key_created(key: FieldKey) -> int:
    """The `created_at` of a key's row (µs since the epoch)."""
    biased: int = _UNPACK(key)[1]
    return biased - _BIAS


def key_event(key: FieldKey) -> str:
    """The event id of a key's row, exactly as the row had it."""
    return key[16:].decode("utf-8", "surrogatepass")


# --- state -------------------------------------------------------------------------------


class RecordState:
    """The merged state of one record. Mutable; only `apply_row`/`merge_into` change the merge
    fields, the caller sets `last_lsn`/`last_applied_us` (bookkeeping, not merged content).

    Invariants:
    - `values.keys() == keys.keys()`; neither holds a name in `RESERVED_FIELDS`;
    - `deleted` implies `values == keys == {}` (a tombstone carries nothing);
    - `exists` and `deleted` never go back to False;
    - key objects (`bytes`, see `make_key`) are shared between the fields a row stamped
      alike, and within a reloaded record between the fields with equal keys; values are the
      row's objects, shared, never mutated.

    Equality compares the merge content (ids, values, keys, flags), not the bookkeeping.
    """

    __slots__ = (
        "deleted",
        "exists",
        "keys",
        "last_applied_us",
        "last_lsn",
        "record_id",
        "user_id",
        "values",
    )

    def __init__(
        self,
        user_id: str,
        record_id: str,
        *,
        values: dict[str, JsonValue] | None = None,
        keys: dict[str, FieldKey] | None = None,
        exists: bool = False,
        deleted: bool = False,
        last_lsn: Lsn | None = None,
        last_applied_us: int | None = None,
    ) -> None:
        self.user_id = user_id
        self.record_id = record_id
        self.values: dict[str, JsonValue] = {} if values is None else values
        self.keys: dict[str, FieldKey] = {} if keys is None else keys
        self.exists = exists
        self.deleted = deleted
        self.last_lsn = last_lsn
        self.last_applied_us = last_applied_us

    def copy(self) -> RecordState:
        """An independent state with the same content (values themselves are shared)."""
        return RecordState(
            self.user_id,
            self.record_id,
            values=dict(self.values),
            keys=dict(self.keys),
            exists=self.exists,
            deleted=self.deleted,
            last_lsn=self.last_lsn,
            last_applied_us=self.last_applied_us,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordState):
            return NotImplemented
        return (
            self.user_id == other.user_id
            and self.record_id == other.record_id
            and self.exists == other.exists
            and self.deleted == other.deleted
            and self.keys == other.keys
            and self.values == other.values
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        flags = "deleted" if self.deleted else ("exists" if self.exists else "empty")
        return (
            f"RecordState({self.user_id!r}, {self.record_id!r}, {flags}, "
            f"fields={sorted(self.values)})"
        )


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """What one `apply_row` did.

    `changed`: the state (values, merge keys, exists, deleted) changed, so it must be persisted.
    `invalid_stamps`: candidate fields of the row whose stamp was invalid (created_at used),
    counted on every application (a replayed row counts again; rows reaching a tombstone are
    not inspected and count 0).
    `created`: the row made the record exist (first non-delete row, no tombstone).
    """

    changed: bool
    invalid_stamps: int
    created: bool = False


_UNCHANGED: Final = ApplyOutcome(False, 0)
_CHANGED: Final = ApplyOutcome(True, 0)
_CREATED: Final = ApplyOutcome(True, 0, True)
_ABSENT: Final = object()


def apply_row(state: RecordState, row: ChangeRow) -> ApplyOutcome:
    """Fold one row into `state` (same user and record; the caller routes rows)."""
    if row.op == OP_DELETE:
        if state.deleted:
            return _UNCHANGED
        state.deleted = True
        state.values = {}
        state.keys = {}
        return _CHANGED

    created = not state.exists and not state.deleted
    changed = not state.exists
    state.exists = True
    data = row.data
    if state.deleted or not data:
        # A tombstone ignores values: nothing may resurrect the record.
        return _CREATED if created else (_CHANGED if changed else _UNCHANGED)

    meta = row.field_meta
    created_at = row.created_at_us
    created_biased = created_at + _BIAS
    event_part = row.event_id.encode("utf-8", "surrogatepass")
    may_be_unstamped = row.op == OP_INSERT
    values = state.values
    keys = state.keys
    invalid = 0
    last_text: object = None  # the row's previous stamp text and its instant: fields of a
    last_parsed: int | None = None  # row nearly always share one stamp, so parse it once
    last_stamp = None
    last_key: FieldKey = b""
    for name, value in data.items():
        if name in RESERVED_FIELDS:
            continue
        raw = meta.get(name, _ABSENT)
        stamp: int | None
        if raw is _ABSENT and may_be_unstamped:
            stamp = UNSTAMPED
        else:
            # Inlined parse_stamp (same rule), memoised on the text within the row.
            text = raw.get("at") if isinstance(raw, dict) else raw
            if isinstance(text, str):
                if text != last_text:
                    last_text = text
                    last_parsed = parse_stamp_text(text) if len(text) <= MAX_STAMP_LEN else None
                stamp = last_parsed
            else:
                stamp = None
            if stamp is None:
                stamp = created_at
                invalid += 1
        # One key per distinct stamp of the row (usually one per row), as make_key builds it.
        if stamp != last_stamp:
            last_stamp = stamp
            last_key = _PACK(stamp + _BIAS, created_biased) + event_part
        current = keys.get(name)
        if current is None:
            name = sys.intern(name)  # one field-name string for all records
            keys[name] = last_key
            values[name] = value
            changed = True
        elif last_key > current:
            keys[name] = last_key
            values[name] = value
            changed = True

    if invalid:
        return ApplyOutcome(changed, invalid, created)
    return _CREATED if created else (_CHANGED if changed else _UNCHANGED)


def merge_into(target: RecordState, source: RecordState) -> bool:
    """Join `source` into `target` in place; True if `target`'s merge content changed.

    Bookkeeping takes the later of both `last_lsn`/`last_applied_us` and does not count as a
    change. `source` is not modified; its values and key objects become shared.
    """
    if target.user_id != source.user_id or target.record_id != source.record_id:
        raise ValueError(
            f"cannot merge record {source.user_id}/{source.record_id} "
            f"into {target.user_id}/{target.record_id}"
        )
    changed = False
    if source.exists and not target.exists:
        target.exists = True
        changed = True
    if source.deleted and not target.deleted:
        target.deleted = True
        target.values = {}
        target.keys = {}
        changed = True
    if not target.deleted:
        keys = target.keys
        values = target.values
        for name, key in source.keys.items():
            current = keys.get(name)
            if current is None or key > current:
                keys[name] = key
                values[name] = source.values[name]
                changed = True
    if source.last_lsn is not None and (
        target.last_lsn is None or source.last_lsn > target.last_lsn
    ):
        target.last_lsn = source.last_lsn
    if source.last_applied_us is not None and (
        target.last_applied_us is None or source.last_applied_us > target.last_applied_us
    ):
        target.last_applied_us = source.last_applied_us
    return changed


def merge_states(a: RecordState, b: RecordState) -> RecordState:
    """The join of two states of the same record, as a new state (commutative, associative,
    idempotent; `merge_states(fold(r1), fold(r2)) == fold(r1 + r2)`)."""
    joined = a.copy()
    merge_into(joined, b)
    return joined


# --- output and persistence --------------------------------------------------------------


def to_record(state: RecordState) -> dict[str, JsonValue]:
    """The merged record: the winning values, `id = record_id`, and `__fieldMeta` with each
    field's winning stamp as ISO text. A new top-level dict; nested values are shared."""
    record: dict[str, JsonValue] = {"id": state.record_id}
    record.update(state.values)
    # A record has a few distinct key objects shared by many fields (see RecordState):
    # format each once.
    texts: dict[FieldKey, str] = {}
    field_meta: dict[str, JsonValue] = {}
    for name, key in state.keys.items():
        text = texts.get(key)
        if text is None:
            stamp, created = _UNPACK(key)  # an unstamped winner reports its row's created_at
            text = texts[key] = format_stamp(
                (created if stamp == _UNSTAMPED_BIASED else stamp) - _BIAS
            )
        field_meta[name] = text
    record["__fieldMeta"] = field_meta
    return record


def keys_to_json(state: RecordState) -> dict[str, JsonValue]:
    """The merge keys as JSON, for the `merge_keys` column beside `record`:
    `{field: [stamp_us | null, created_us, event_id]}`, null standing for an unstamped insert
    field. The integers of real instants stay below 2**53, so JSON readers keep them exact."""
    out: dict[str, JsonValue] = {}
    entries: dict[FieldKey, JsonValue] = {}  # one list per distinct key object
    for name, key in state.keys.items():
        entry = entries.get(key)
        if entry is None:
            stamp, created = _UNPACK(key)
            entry = entries[key] = [
                None if stamp == _UNSTAMPED_BIASED else stamp - _BIAS,
                created - _BIAS,
                key[16:].decode("utf-8", "surrogatepass"),  # key_event, inlined
            ]
        out[name] = entry
    return out


_JsonKey: TypeAlias = tuple[int, int, str]


def _key_from_json(name: str, entry: object) -> _JsonKey:
    if isinstance(entry, list) and len(entry) == 3:
        stamp, created, event_id = entry
        if (
            (stamp is None or (isinstance(stamp, int) and not isinstance(stamp, bool)))
            and isinstance(created, int)
            and not isinstance(created, bool)
            and isinstance(event_id, str)
        ):
            return (UNSTAMPED if stamp is None else stamp, created, event_id)
    raise ValueError(f"merge key of field {name!r} is not [stamp|null, created, event]: {entry!r}")


def state_from_persisted(
    user_id: str,
    record_id: str,
    record: Mapping[str, JsonValue],
    keys_json: Mapping[str, JsonValue],
    deleted: bool,
    exists: bool | None = None,
    *,
    last_lsn: Lsn | None = None,
    last_applied_us: int | None = None,
) -> RecordState:
    """Rebuild a state from `to_record` output and `keys_to_json` output; it merges exactly
    like the state they were taken from. `exists` defaults to `not deleted` (a tombstone's
    `exists` only tells whether a non-delete row was seen; views ignore it).

    Raises ValueError when a record field has no key or a key no field (`id` and
    `__fieldMeta` of the record are derived and ignored), or a key is not
    `[stamp|null, created, event]` with integers that fit 64 bits.
    """
    state = RecordState(
        user_id,
        record_id,
        exists=(not deleted) if exists is None else exists,
        deleted=deleted,
        last_lsn=last_lsn,
        last_applied_us=last_applied_us,
    )
    if deleted:
        return state
    # One key object per distinct key, as after apply_row; built once per distinct triple, so
    # the triples and the JSON's ints and strings are garbage when this returns.
    shared: dict[_JsonKey, FieldKey] = {}
    for name, entry in keys_json.items():
        if name not in record or name in RESERVED_FIELDS:
            raise ValueError(f"record {user_id}/{record_id}: merge key for missing field {name!r}")
        triple = _key_from_json(name, entry)
        key = shared.get(triple)
        if key is None:
            try:
                key = shared[triple] = make_key(*triple)
            except struct.error:
                raise ValueError(
                    f"record {user_id}/{record_id}: merge key of field {name!r} "
                    f"is out of the 64-bit range: {entry!r}"
                ) from None
        name = sys.intern(name)
        state.keys[name] = key
        state.values[name] = record[name]
    for name in record:
        if name not in state.keys and name not in RESERVED_FIELDS:
            raise ValueError(f"record {user_id}/{record_id}: field {name!r} has no merge key")
    return state


# --- views -------------------------------------------------------------------------------


def _js_truthy(value: JsonValue) -> bool:
    # JS truthiness as the web app applies it: null, false, 0, NaN and "" are falsy;
    # every array and object (even empty) is truthy.
    if value is None or value is False or value == "":
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0 and value == value
    return True


def mission_view(state: RecordState) -> dict[str, JsonValue] | None:
    """The mission record, or None if it never existed or was deleted. A soft-deleted
    mission (merged `deletedAt` set) is kept; due-ness filters it."""
    if not state.exists or state.deleted:
        return None
    return to_record(state)


def agent_is_live(state: RecordState) -> bool:
    """An agent exists, has no tombstone and no truthy merged `deletedAt`."""
    return state.exists and not state.deleted and not _js_truthy(state.values.get("deletedAt"))


def agent_view(state: RecordState) -> dict[str, JsonValue] | None:
    """The agent record, or None if it never existed, was deleted or has `deletedAt` set."""
    return to_record(state) if agent_is_live(state) else None
