"""The decoded shape of one `sync_changes` row, as the projections consume it.

A `ChangeRow` is produced after validation (see domain.md §1 and `projections.decode`); by
the time one exists, `op` is one of `insert`/`update`/`delete`, the ids are non-empty, and
`data` is an object for inserts and updates (a delete's `data` may be None or an object).
The projections never re-validate these invariants.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.json_types import JsonValue


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One validated row of `sync_changes`.

    Invariants (established by whoever builds it, relied on by the merge):
    - `op` is in `core.sync_changes.OPS`; `event_id`, `app_id`, `table_name`, `record_id`,
      `user_id` are non-empty;
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
