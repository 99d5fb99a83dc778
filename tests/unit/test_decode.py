"""Decoding sync_changes rows: the fast path against the checked path on generated rows,
and the pieces the fast path builds with."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.sync_changes import AGENTS_TABLE, APP_ID, COLUMNS, MISSIONS_TABLE
from projections.decode import (
    Rejected,
    Value,
    _change_row,
    _created_at_us,
    _decode_checked,
    column_indexes,
    decode_columns,
    decode_row,
    parse_created_at,
    picker,
    raw_columns,
    wanted,
)
from projections.rows import ChangeRow
from stream.pgoutput import UNCHANGED

EVENT = b"0b6f7c1e-3d2a-4f5b-9c8d-7e6f5a4b3c2d"
CREATED = b"2026-04-15 00:00:00.123456+00"
GOOD = (
    EVENT,
    b"ai",
    b"aiMissions",
    b"m1",
    b"u1",
    b"update",
    b'{"title": "x", "cadence": {"kind": "daily"}}',
    b'{"title": {"at": "2026-04-15T00:00:00.000Z"}}',
    CREATED,
)

# Each column: valid values first, then every way it can be wrong.
CHOICES: list[list[Value]] = [
    [EVENT, b"e", b"", b"\xff\xfe", None, UNCHANGED],
    [b"ai", b"other", None, UNCHANGED],
    [b"aiMissions", b"agents", b"notes", None, UNCHANGED],
    [b"m1", "caf\u00e9".encode(), b"", b"\xff", None, UNCHANGED],
    [b"u1", b"", b"\xc3", None, UNCHANGED],
    [b"insert", b"update", b"delete", b"upsert", b"", None, UNCHANGED],
    [GOOD[6], b"{}", b"[1, 2]", b"null", b'"text"', b"{bad", b"\xff", None, UNCHANGED],
    [GOOD[7], b"{}", b'{"title": "2026-04-15T00:00:00Z"}', b"[]", b"null", b"{", None, UNCHANGED],
    [
        CREATED,
        b"2026-04-15 00:00:00+00",
        b"2026-04-15 00:00:00.5+00",
        b"2026-04-15 02:00:00+02",
        b"2026-04-15 00:00:00",
        b"2026-13-01 00:00:00+00",
        b"yesterday",
        b"\xff",
        b"",
        None,
        UNCHANGED,
    ],
]

ROWS = st.tuples(*(st.sampled_from(choices) for choices in CHOICES))
JSON_DATA = st.dictionaries(
    st.text(max_size=5),
    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5)),
    max_size=4,
)


def checked(columns: tuple[Value, ...]) -> ChangeRow | Rejected | None:
    """The reference: `wanted`, then every check in order (the checked path)."""
    if not wanted(columns, tuple(range(len(COLUMNS)))):
        return None
    table = {b"aiMissions": MISSIONS_TABLE, b"agents": AGENTS_TABLE}[columns[2]]  # type: ignore[index]
    return _decode_checked(columns, table)


@settings(max_examples=1500)
@given(ROWS)
def test_the_fast_path_returns_what_the_checked_path_returns(columns: tuple[Value, ...]) -> None:
    assert decode_columns(columns) == checked(columns)


@given(JSON_DATA, JSON_DATA)
def test_generated_json_objects(data: dict[str, object], meta: dict[str, object]) -> None:
    columns = (*GOOD[:6], orjson.dumps(data), orjson.dumps(meta), CREATED)
    row = decode_columns(columns)
    assert row == checked(columns)
    assert isinstance(row, ChangeRow) and row.data == data and row.field_meta == meta


def test_a_good_row() -> None:
    row = decode_columns(GOOD)
    assert row == ChangeRow(
        event_id=EVENT.decode(),
        app_id=APP_ID,
        table_name=MISSIONS_TABLE,
        record_id="m1",
        user_id="u1",
        op="update",
        data={"title": "x", "cadence": {"kind": "daily"}},
        field_meta={"title": {"at": "2026-04-15T00:00:00.000Z"}},
        created_at_us=parse_created_at(CREATED),
    )
    assert row == checked(GOOD)


def test_rejections_name_the_first_problem() -> None:
    toast = decode_columns((*GOOD[:6], UNCHANGED, GOOD[7], CREATED))
    assert isinstance(toast, Rejected) and toast.reason == "unchanged-toast"
    bad_json = decode_columns((*GOOD[:6], b"{", GOOD[7], b"bad"))
    assert isinstance(bad_json, Rejected) and bad_json.reason == "bad-created-at"
    assert bad_json.raw == raw_columns((*GOOD[:6], b"{", GOOD[7], b"bad"), tuple(range(9)))


def test_rows_that_are_not_ours() -> None:
    assert decode_columns((GOOD[0], b"other", *GOOD[2:])) is None
    assert decode_columns((*GOOD[:2], b"notes", *GOOD[3:])) is None
    with pytest.raises(ValueError, match="wanted rows only"):
        decode_row((GOOD[0], b"other", *GOOD[2:]), tuple(range(9)))


def test_decode_row_reads_the_relation_layout() -> None:
    names = ("client_id", *reversed(COLUMNS), "space_id")
    idx = column_indexes(names)
    assert idx is not None
    values = (b"c", *reversed(GOOD), None)
    assert picker(idx)(values) == GOOD
    assert decode_row(values, idx) == decode_columns(GOOD)
    assert column_indexes(("id", "app_id")) is None
    with pytest.raises(ValueError):
        picker((0, 1))


@pytest.mark.parametrize("text", [c for c in CHOICES[8] if isinstance(c, bytes)])
def test_created_at_memo_matches_the_parser(text: bytes) -> None:
    try:
        expected: int | None = parse_created_at(text)
    except ValueError:
        expected = None
    assert _created_at_us(text) == expected
    assert _created_at_us(text) == expected  # and again, from the memo


def test_change_row_is_the_constructor() -> None:
    built = _change_row("e", APP_ID, AGENTS_TABLE, "r", "u", "insert", {"a": 1}, {}, 5)
    made = ChangeRow("e", APP_ID, AGENTS_TABLE, "r", "u", "insert", {"a": 1}, {}, 5)
    assert built == made
    assert repr(built) == repr(made)
    with pytest.raises(AttributeError):
        built.op = "delete"  # type: ignore[misc]
