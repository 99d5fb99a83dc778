"""Replication errors are classified by SQLSTATE alone: the message text, which follows the
server's `lc_messages`, does not matter."""

from __future__ import annotations

import pytest
from psycopg import pq

from stream.consumer import classify_result_error
from stream.errors import ConnectionLostError, ReplicationError, SlotInUseError


class _Result:
    """A failed PGresult's error fields (the only part the classifier reads)."""

    def __init__(self, sqlstate: str | None, message: str, detail: str = "") -> None:
        self._fields = {
            pq.DiagnosticField.SQLSTATE: None if sqlstate is None else sqlstate.encode(),
            pq.DiagnosticField.MESSAGE_PRIMARY: message.encode(),
            pq.DiagnosticField.MESSAGE_DETAIL: detail.encode(),
        }

    def error_field(self, field: pq.DiagnosticField) -> bytes | None:
        return self._fields.get(field)


TEXTS = [
    'replication slot "s" does not exist',
    "Replikations-Slot »s« existiert nicht",
    "该复制槽已失效",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("55006", SlotInUseError),
        ("08006", ConnectionLostError),
        ("57P01", ConnectionLostError),
        (None, ConnectionLostError),
        ("42704", ReplicationError),
        ("55000", ReplicationError),
        ("58P01", ReplicationError),
    ],
)
def test_the_kind_follows_the_sqlstate_whatever_the_text(
    sqlstate: str | None, kind: type[ReplicationError], text: str
) -> None:
    error = classify_result_error(_Result(sqlstate, text, text), "s")  # type: ignore[arg-type]
    assert type(error) is kind
    assert error.sqlstate == sqlstate
