"""Turning a `sync_changes` row (text-format column values) into a ChangeRow or a dead letter.

The same functions serve the replication stream (pgoutput tuples, text format) and the
snapshot loads (`SELECT ...::text`), so both paths accept and reject exactly the same rows.
Pure: no I/O, no clock.

Every row of the stream passes through here, so there are two paths with one contract. The
fast path takes a row whose columns are all present and well-formed and builds its ChangeRow
with as few steps as it can; at the first thing it does not expect, it hands the row to the
checked path, which decides what is wrong (and in which order the checks report it). The
fast path only ever returns what the checked path returns for the same row; a unit test
holds the two to that on generated rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import itemgetter
from typing import Final

import orjson

from core.json_types import JsonObject, JsonValue
from core.sync_changes import AGENTS_TABLE, APP_ID, COLUMNS, MISSIONS_TABLE
from projections.rows import ChangeRow

_APP = APP_ID.encode()
_TABLES: Final = {MISSIONS_TABLE.encode(): MISSIONS_TABLE, AGENTS_TABLE.encode(): AGENTS_TABLE}
_OPS: Final = {b"insert": "insert", b"update": "update", b"delete": "delete"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_IN_ORDER: Final = tuple(range(len(COLUMNS)))  # the `idx` of a row already in COLUMNS order
_loads: Final = orjson.loads

Value = bytes | None | object  # a text value, NULL, or the unchanged-TOAST sentinel
Picker = Callable[[tuple[Value, ...]], tuple[Value, ...]]
"""Takes a relation's tuple to the COLUMNS values, in COLUMNS order (see `picker`)."""

# Dead-letter reasons (the `reason` label of mana_ai_stream_dead_letters_total).
MISSING_IDS: Final = "missing-ids"
UNKNOWN_OP: Final = "unknown-op"
INVALID_JSON: Final = "invalid-json"
DATA_NOT_OBJECT: Final = "data-not-object"
BAD_CREATED_AT: Final = "bad-created-at"
UNCHANGED_TOAST: Final = "unchanged-toast"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A row that cannot be applied: it goes to the dead-letter table with its raw columns."""

    event_id: str | None
    reason: str
    detail: str
    raw: dict[str, JsonValue]


def column_indexes(names: tuple[str, ...]) -> tuple[int, ...] | None:
    """Positions of COLUMNS in a relation's column list; None if one is missing."""
    try:
        return tuple(names.index(c) for c in COLUMNS)
    except ValueError:
        return None


def picker(idx: tuple[int, ...]) -> Picker:
    """A function from a relation's tuple to its COLUMNS values (positions from
    `column_indexes`): one C call per row, for `decode_columns`."""
    if len(idx) != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} column positions, got {len(idx)}")
    get: Picker = itemgetter(*idx)
    return get


def _text(value: Value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None


def raw_columns(values: tuple[Value, ...], idx: tuple[int, ...]) -> dict[str, JsonValue]:
    """The row's columns as text, for the dead-letter table (loses nothing we read)."""
    return {name: _text(values[i]) for name, i in zip(COLUMNS, idx, strict=True)}


def parse_created_at(text: bytes) -> int:
    """`2026-04-15 00:00:00.123456+00` (ISO DateStyle, UTC session) → µs since the epoch."""
    dt = datetime.fromisoformat(text.decode("ascii"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _ONE_US


@lru_cache(maxsize=1024)
def _created_at_us(text: bytes) -> int | None:
    # A memo of `parse_created_at`: the rows of one transaction share its start time
    # (`DEFAULT now()`), so nearly every row hits. Keys are timestamp texts of bounded
    # length (the fast path passes column values of a timestamptz column only).
    try:
        return parse_created_at(text)
    except (ValueError, UnicodeDecodeError):
        return None


def wanted(values: tuple[Value, ...], idx: tuple[int, ...]) -> bool:
    """Cheap pre-check: is this an `ai` mission or agent row? Others are not ours at all."""
    return values[idx[1]] == _APP and values[idx[2]] in _TABLES


def decode_row(values: tuple[Value, ...], idx: tuple[int, ...]) -> ChangeRow | Rejected:
    """Decode one wanted row (see `wanted`). Never raises for bad data: returns Rejected."""
    row = decode_columns(picker(idx)(values))
    if row is None:
        raise ValueError("decode_row takes wanted rows only (an `ai` mission or agent row)")
    return row


def decode_columns(columns: tuple[Value, ...]) -> ChangeRow | Rejected | None:
    """Decode the COLUMNS values of a row (in COLUMNS order, see `picker`): None when it is
    not an `ai` mission or agent row (`wanted`), else a ChangeRow or, for bad data, Rejected.
    Never raises."""
    event_raw, app, table, record_raw, user_raw, op, raw_data, raw_meta, raw_created = columns
    table_name = _TABLES.get(table)  # type: ignore[arg-type]
    if app != _APP or table_name is None:
        return None
    # The fast path. Every condition is one the checked path also needs for a ChangeRow,
    # and each value it builds is built the same way there (a strict UTF-8 decode equals
    # the checked path's lenient one when it succeeds), so its ChangeRow is the same.
    if (
        type(event_raw) is bytes
        and type(record_raw) is bytes
        and type(user_raw) is bytes
        and type(raw_data) is bytes
        and type(raw_meta) is bytes
        and type(raw_created) is bytes
        and record_raw
        and user_raw
    ):
        op_name = _OPS.get(op)  # type: ignore[arg-type]
        created_at_us = _created_at_us(raw_created)
        if op_name is not None and created_at_us is not None:
            try:
                event_id = event_raw.decode()
                record_id = record_raw.decode()
                user_id = user_raw.decode()
                data = _loads(raw_data)
                field_meta = _loads(raw_meta)
            except ValueError:  # not UTF-8, not JSON: the checked path says which
                pass
            else:
                if event_id and type(data) is dict and type(field_meta) is dict:
                    return _change_row(
                        event_id,
                        APP_ID,
                        table_name,
                        record_id,
                        user_id,
                        op_name,
                        data,
                        field_meta,
                        created_at_us,
                    )
    return _decode_checked(columns, table_name)


class _Reject(Exception):
    """A check failed: `reason` (a dead-letter reason) and `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_I_ID, _I_APP, _I_TABLE, _I_REC, _I_USER, _I_OP, _I_DATA, _I_META, _I_CREATED = _IN_ORDER


def _all_sent(values: tuple[Value, ...]) -> None:
    if any(v is not None and not isinstance(v, bytes) for v in values):
        raise _Reject(UNCHANGED_TOAST, "a column was sent as unchanged TOAST")


def _ids(values: tuple[Value, ...], event_id: str | None) -> tuple[str, bytes, bytes]:
    record_id, user_id = values[_I_REC], values[_I_USER]
    if not event_id or not record_id or not user_id:
        raise _Reject(MISSING_IDS, "id, record_id or user_id is missing or empty")
    assert isinstance(record_id, bytes) and isinstance(user_id, bytes)
    return event_id, record_id, user_id


def _op(values: tuple[Value, ...]) -> str:
    op = _OPS.get(values[_I_OP])  # type: ignore[arg-type]
    if op is None:
        raise _Reject(UNKNOWN_OP, f"op {_text(values[_I_OP])!r} is not insert/update/delete")
    return op


def _created(values: tuple[Value, ...]) -> int:
    raw = values[_I_CREATED]
    try:
        assert isinstance(raw, bytes)
        return parse_created_at(raw)
    except (AssertionError, ValueError, UnicodeDecodeError):
        raise _Reject(BAD_CREATED_AT, f"created_at {_text(raw)!r} is not a timestamp") from None


def _json(raw: Value, column: str) -> JsonValue:
    try:
        return orjson.loads(raw)  # type: ignore[arg-type, no-any-return]
    except orjson.JSONDecodeError as exc:
        raise _Reject(INVALID_JSON, f"{column}: {exc}") from None


def _data(values: tuple[Value, ...], op: str) -> dict[str, JsonValue] | None:
    raw = values[_I_DATA]
    data = None if raw is None else _json(raw, "data")
    if op == "delete":
        return data if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise _Reject(
            DATA_NOT_OBJECT, f"data of an {op} must be a JSON object, got {type(data).__name__}"
        )
    return data


def _field_meta(values: tuple[Value, ...], data: dict[str, JsonValue] | None) -> JsonObject:
    raw = values[_I_META]
    field_meta = {} if raw is None else _json(raw, "field_meta")
    if isinstance(field_meta, dict):
        return field_meta
    # Not an object: no field has a valid stamp; each falls back to created_at.
    return dict.fromkeys(data, None) if data is not None else {}


def _decode_checked(columns: tuple[Value, ...], table_name: str) -> ChangeRow | Rejected:
    """Every check, in the order they report: the first failing one names the reason."""
    raw_id = columns[_I_ID]
    event_id = raw_id.decode("utf-8", "replace") if isinstance(raw_id, bytes) else None
    try:
        _all_sent(columns)
        event_id, record_id, user_id = _ids(columns, event_id)
        op = _op(columns)
        created_at_us = _created(columns)
        data = _data(columns, op)
        field_meta = _field_meta(columns, data)
        return ChangeRow(
            event_id=event_id,
            app_id=APP_ID,
            table_name=table_name,
            record_id=record_id.decode("utf-8"),
            user_id=user_id.decode("utf-8"),
            op=op,
            data=data,
            field_meta=field_meta,
            created_at_us=created_at_us,
        )
    except _Reject as rejected:
        reason, detail = rejected.reason, rejected.detail
    except UnicodeDecodeError as exc:
        reason, detail = MISSING_IDS, f"not UTF-8: {exc}"
    return Rejected(event_id, reason, detail, raw_columns(columns, _IN_ORDER))


def _change_row(
    event_id: str,
    app_id: str,
    table_name: str,
    record_id: str,
    user_id: str,
    op: str,
    data: dict[str, JsonValue],
    field_meta: dict[str, JsonValue],
    created_at_us: int,
) -> ChangeRow:
    """`ChangeRow(...)` without the frozen-dataclass `__init__` (which goes through
    `object.__setattr__` per field, a third of the fast path's time): the slot descriptors
    set the same fields; equal to the constructor's result, as the unit tests check."""
    row = _object_new(ChangeRow)
    _set_event_id(row, event_id)
    _set_app_id(row, app_id)
    _set_table_name(row, table_name)
    _set_record_id(row, record_id)
    _set_user_id(row, user_id)
    _set_op(row, op)
    _set_data(row, data)
    _set_field_meta(row, field_meta)
    _set_created_at_us(row, created_at_us)
    return row


_object_new: Final = object.__new__
_set_event_id: Final = ChangeRow.__dict__["event_id"].__set__
_set_app_id: Final = ChangeRow.__dict__["app_id"].__set__
_set_table_name: Final = ChangeRow.__dict__["table_name"].__set__
_set_record_id: Final = ChangeRow.__dict__["record_id"].__set__
_set_user_id: Final = ChangeRow.__dict__["user_id"].__set__
_set_op: Final = ChangeRow.__dict__["op"].__set__
_set_data: Final = ChangeRow.__dict__["data"].__set__
_set_field_meta: Final = ChangeRow.__dict__["field_meta"].__set__
_set_created_at_us: Final = ChangeRow.__dict__["created_at_us"].__set__
