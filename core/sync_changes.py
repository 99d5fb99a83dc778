"""The `sync_changes` contract (domain.md §1): where the table is, which of its columns we
read and in which order, and the values that pick our rows.

The sync service owns the table; we read it (stream, initial load, input resolution) and
append to it (iterations). These names are the one place the code spells them.
"""

from __future__ import annotations

from typing import Final

SOURCE_SCHEMA: Final = "public"
SOURCE_TABLE: Final = "sync_changes"
QUALIFIED_NAME: Final = f"{SOURCE_SCHEMA}.{SOURCE_TABLE}"

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
"""The columns the consumer reads, in this order. On PostgreSQL 15+ the publication sends
only these (a column list), so the other columns are neither sent nor decoded."""

APP_ID: Final = "ai"
"""`app_id` of every row this service projects."""

MISSIONS_TABLE: Final = "aiMissions"
"""`table_name` of mission rows (with `app_id = APP_ID`)."""

AGENTS_TABLE: Final = "agents"
"""`table_name` of agent rows (with `app_id = APP_ID`)."""

OP_INSERT: Final = "insert"
OP_UPDATE: Final = "update"
OP_DELETE: Final = "delete"
OPS: Final = frozenset((OP_INSERT, OP_UPDATE, OP_DELETE))
"""The only values `op` takes (the table's CHECK constraint)."""

CLIENT_ID: Final = "mana-ai-runner"
"""`client_id` of the rows we append."""
