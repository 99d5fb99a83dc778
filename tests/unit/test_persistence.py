"""Serialising snapshots for the database, without a database: the snapshot row of a state
and the COPY text of a batch, read back with an independent parser of COPY's format."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from core.instants import us_to_datetime
from core.lsn import Lsn
from projections.merge import RecordState, keys_to_json, make_key, to_record
from projections.persistence import SnapshotRow, copy_text, serialize

T0 = 1_776_211_200_123_456


def state(user: str = "u1", record: str = "m1", **values: object) -> RecordState:
    s = RecordState(user, record, exists=True, last_lsn=Lsn(0x1_0000_00A0), last_applied_us=T0)
    key = make_key(T0, T0, "ev1")
    for name, value in values.items():
        s.values[name] = value  # type: ignore[assignment]
        s.keys[name] = key
    return s


def test_serialize_is_the_constructor() -> None:
    s = state(title="x", cadence={"kind": "daily"})
    assert serialize(s) == SnapshotRow(
        user_id="u1",
        record_id="m1",
        record=orjson.dumps(to_record(s)),
        merge_keys=orjson.dumps(keys_to_json(s)),
        last_applied_us=T0,
        lsn=Lsn(0x1_0000_00A0),
        deleted=False,
    )
    blank = RecordState("u1", "m2", deleted=True)
    row = serialize(blank)
    assert (row.last_applied_us, row.lsn, row.deleted) == (0, Lsn(0), True)
    assert type(row.record) is bytes and type(row.merge_keys) is bytes


def parse_copy_text(data: bytes) -> list[list[str]]:
    """COPY's text format read back (PostgreSQL docs, "COPY", File Formats): tab between
    columns, newline after each row, backslash escapes."""
    assert data.endswith(b"\n")
    rows = []
    for line in data[:-1].split(b"\n"):
        fields = []
        for raw in line.split(b"\t"):
            out, i = bytearray(), 0
            while i < len(raw):
                if raw[i] == 0x5C:  # backslash
                    nxt = raw[i + 1 : i + 2]
                    out += {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"\\": b"\\"}[nxt]
                    i += 2
                else:
                    out.append(raw[i])
                    i += 1
            fields.append(out.decode())
        rows.append(fields)
    return rows


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)


@given(st.lists(st.tuples(TEXT, TEXT, TEXT, st.booleans()), min_size=1, max_size=5))
def test_copy_text_reads_back_field_for_field(
    specs: list[tuple[str, str, str, bool]],
) -> None:
    states = []
    for user, record, title, deleted in specs:
        s = state(user, record, title=title, note="a\\b\tc\nd\re")
        s.deleted = deleted
        states.append(s)
    rows = [serialize(s) for s in states]
    parsed = parse_copy_text(copy_text(rows))
    assert len(parsed) == len(rows)
    for fields, row in zip(parsed, rows, strict=True):
        assert fields == [
            row.user_id,
            row.record_id,
            row.record.decode(),
            row.merge_keys.decode(),
            us_to_datetime(row.last_applied_us).isoformat(),
            str(row.lsn),
            "t" if row.deleted else "f",
        ]


def test_copy_text_of_nothing() -> None:
    assert copy_text([]) == b""
