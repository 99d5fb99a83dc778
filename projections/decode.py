"""Turning a `sync_changes` row (text-format column values) into a ChangeRow or a dead letter.

The same function serves the replication stream (pgoutput tuples, text format) and the
snapshot loads (`SELECT ...::text`), so both paths accept and reject exactly the same rows.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import orjson

from projections.rows import AGENTS_TABLE, APP_ID, MISSIONS_TABLE, ChangeRow, JsonValue

# The columns we read, in this order, from a row of sync_changes.
COLUMNS: Final = (
    "id",
    "app_id",
    "table_name",
    "record_id",
    "user_id",
    "op",
    "data",
    "field_meta",
    "created_at",
)

_APP = APP_ID.encode()
_TABLES: Final = {MISSIONS_TABLE.encode(): MISSIONS_TABLE, AGENTS_TABLE.encode(): AGENTS_TABLE}
_OPS: Final = {b"insert": "insert", b"update": "update", b"delete": "delete"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)

Value = bytes | None | object  # a text value, NULL, or the unchanged-TOAST sentinel

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


def wanted(values: tuple[Value, ...], idx: tuple[int, ...]) -> bool:
    """Cheap pre-check: is this an `ai` mission or agent row? Others are not ours at all."""
    return values[idx[1]] == _APP and values[idx[2]] in _TABLES


def decode_row(values: tuple[Value, ...], idx: tuple[int, ...]) -> ChangeRow | Rejected:
    """Decode one wanted row (see `wanted`). Never raises for bad data: returns Rejected."""
    i_id, _i_app, i_table, i_rec, i_user, i_op, i_data, i_meta, i_created = idx
    raw_id = values[i_id]
    event_id = raw_id.decode("utf-8", "replace") if isinstance(raw_id, bytes) else None
    try:
        for i in idx:
            if values[i] is not None and not isinstance(values[i], bytes):
                return Rejected(
                    event_id,
                    UNCHANGED_TOAST,
                    "a column was sent as unchanged TOAST",
                    raw_columns(values, idx),
                )
        record_id = values[i_rec]
        user_id = values[i_user]
        if not event_id or not record_id or not user_id:
            return Rejected(
                event_id,
                MISSING_IDS,
                "id, record_id or user_id is missing or empty",
                raw_columns(values, idx),
            )
        assert isinstance(record_id, bytes) and isinstance(user_id, bytes)
        op = _OPS.get(values[i_op])  # type: ignore[arg-type]
        if op is None:
            return Rejected(
                event_id,
                UNKNOWN_OP,
                f"op {_text(values[i_op])!r} is not insert/update/delete",
                raw_columns(values, idx),
            )
        raw_created = values[i_created]
        try:
            assert isinstance(raw_created, bytes)
            created_at_us = parse_created_at(raw_created)
        except (AssertionError, ValueError, UnicodeDecodeError):
            return Rejected(
                event_id,
                BAD_CREATED_AT,
                f"created_at {_text(raw_created)!r} is not a timestamp",
                raw_columns(values, idx),
            )
        raw_data = values[i_data]
        data: JsonValue = None
        if raw_data is not None:
            try:
                data = orjson.loads(raw_data)  # type: ignore[arg-type]
            except orjson.JSONDecodeError as exc:
                return Rejected(event_id, INVALID_JSON, f"data: {exc}", raw_columns(values, idx))
        if op == "delete":
            if data is not None and not isinstance(data, dict):
                data = None
        elif not isinstance(data, dict):
            return Rejected(
                event_id,
                DATA_NOT_OBJECT,
                f"data of an {op} must be a JSON object, got {type(data).__name__}",
                raw_columns(values, idx),
            )
        raw_meta = values[i_meta]
        field_meta: JsonValue = {}
        if raw_meta is not None:
            try:
                field_meta = orjson.loads(raw_meta)  # type: ignore[arg-type]
            except orjson.JSONDecodeError as exc:
                return Rejected(
                    event_id, INVALID_JSON, f"field_meta: {exc}", raw_columns(values, idx)
                )
        if not isinstance(field_meta, dict):
            # Not an object: no field has a valid stamp; each falls back to created_at.
            field_meta = dict.fromkeys(data, None) if isinstance(data, dict) else {}
        return ChangeRow(
            event_id=event_id,
            app_id=APP_ID,
            table_name=_TABLES[values[i_table]],  # type: ignore[index]
            record_id=record_id.decode("utf-8"),
            user_id=user_id.decode("utf-8"),
            op=op,
            data=data if isinstance(data, dict) else None,
            field_meta=field_meta,
            created_at_us=created_at_us,
        )
    except UnicodeDecodeError as exc:
        return Rejected(event_id, MISSING_IDS, f"not UTF-8: {exc}", raw_columns(values, idx))
