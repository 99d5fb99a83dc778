"""The decoded shape of one `sync_changes` row, as the projections consume it.

A `ChangeRow` is produced by the stream layer after validation (see domain.md §1); by the time
one exists, `op` is one of `insert`/`update`/`delete`, the ids are non-empty, and `data` is an
object for inserts and updates (a delete's `data` may be None or an object). The projections
never re-validate these invariants.

`JsonValue` is the type of every decoded JSON value in the domain: the projections store field
values as they arrived and never look inside them, except for the few fields the views read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
"""Any value `json.loads`/`orjson.loads` can return."""

JsonObject: TypeAlias = "dict[str, JsonValue]"
"""A decoded JSON object (a record, a row's `data` or `field_meta`)."""

APP_ID = "ai"
"""`sync_changes.app_id` of every row this service projects."""

MISSIONS_TABLE = "aiMissions"
"""`sync_changes.table_name` of mission rows (with `app_id = APP_ID`)."""

AGENTS_TABLE = "agents"
"""`sync_changes.table_name` of agent rows (with `app_id = APP_ID`)."""

OP_INSERT = "insert"
OP_UPDATE = "update"
OP_DELETE = "delete"
OPS = frozenset((OP_INSERT, OP_UPDATE, OP_DELETE))
"""The only values `ChangeRow.op` takes (the table's CHECK constraint)."""


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One validated row of `sync_changes`.

    Invariants (established by whoever builds it, relied on by the merge):
    - `op` is in `OPS`; `event_id`, `app_id`, `table_name`, `record_id`, `user_id` are non-empty;
    - `data` is a dict for `insert`/`update`; None or a dict for `delete`;
    - `field_meta` is a dict (the column defaults to `'{}'`; SQL NULL is decoded as `{}`);
    - `created_at_us` is the server's `created_at` in microseconds since the Unix epoch, UTC.

    The dicts are shared, not copied, by the snapshots built from the row: nobody may mutate
    `data` or `field_meta` (or any value inside them) after the row is built.
    """

    event_id: str
    app_id: str
    table_name: str
    record_id: str
    user_id: str
    op: str
    data: dict[str, JsonValue] | None
    field_meta: dict[str, JsonValue]
    created_at_us: int
