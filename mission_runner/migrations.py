"""Schema migrations for the `mana_ai` schema (ours; `sync_changes` is never touched here).

Migrations are ordered, idempotent, recorded in `mana_ai.schema_migrations`, and run at start
under a transaction-scoped advisory lock so two processes starting together do not race.
"""

from __future__ import annotations

import logging

from psycopg import AsyncConnection
from psycopg.rows import scalar_row

log = logging.getLogger(__name__)

_LOCK_KEY = 0x6D616E615F6169  # "mana_ai"

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "snapshots, checkpoint and dead letters",
        """
        CREATE SCHEMA IF NOT EXISTS mana_ai;

        CREATE TABLE IF NOT EXISTS mana_ai.mission_snapshots (
            user_id          text        NOT NULL,
            mission_id       text        NOT NULL,
            record           jsonb       NOT NULL,
            merge_keys       jsonb       NOT NULL DEFAULT '{}',
            last_applied_at  timestamptz NOT NULL,
            updated_at       timestamptz NOT NULL DEFAULT now(),
            lsn              pg_lsn      NOT NULL,
            deleted          boolean     NOT NULL DEFAULT false,
            PRIMARY KEY (user_id, mission_id)
        );

        CREATE TABLE IF NOT EXISTS mana_ai.agent_snapshots (
            user_id          text        NOT NULL,
            agent_id         text        NOT NULL,
            record           jsonb       NOT NULL,
            merge_keys       jsonb       NOT NULL DEFAULT '{}',
            last_applied_at  timestamptz NOT NULL,
            updated_at       timestamptz NOT NULL DEFAULT now(),
            lsn              pg_lsn      NOT NULL,
            deleted          boolean     NOT NULL DEFAULT false,
            PRIMARY KEY (user_id, agent_id)
        );

        CREATE TABLE IF NOT EXISTS mana_ai.stream_checkpoint (
            slot_name    text        PRIMARY KEY,
            lsn          pg_lsn      NOT NULL,
            commit_time  timestamptz,
            updated_at   timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE IF NOT EXISTS mana_ai.dead_letter (
            id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            lsn       pg_lsn      NOT NULL,
            event_id  text,
            reason    text        NOT NULL,
            raw       jsonb       NOT NULL,
            ts        timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS dead_letter_ts_idx ON mana_ai.dead_letter (ts);
        """,
    ),
    (
        2,
        "dispatch ledger and token usage",
        """
        CREATE TABLE IF NOT EXISTS mana_ai.dispatch_ledger (
            user_id       text        NOT NULL,
            mission_id    text        NOT NULL,
            occurrence    timestamptz NOT NULL,
            iteration_id  text,
            status        text        NOT NULL
                CHECK (status IN ('planning', 'written', 'failed', 'abandoned')),
            attempts      int         NOT NULL DEFAULT 0,
            last_error    text,
            updated_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, mission_id, occurrence)
        );

        CREATE TABLE IF NOT EXISTS mana_ai.token_usage (
            id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            user_id     text        NOT NULL,
            agent_id    text        NOT NULL,
            mission_id  text        NOT NULL,
            tokens      int         NOT NULL CHECK (tokens > 0),
            ts          timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS token_usage_ts_idx ON mana_ai.token_usage (ts);
        """,
    ),
    (
        3,
        "fencing token: the epoch of the slot's leader",
        """
        ALTER TABLE mana_ai.stream_checkpoint
            ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
        -- A row without a position: a leader has taken the slot, nothing is persisted yet.
        ALTER TABLE mana_ai.stream_checkpoint ALTER COLUMN lsn DROP NOT NULL;
        """,
    ),
]


async def migrate(conn: AsyncConnection[tuple[object, ...]]) -> list[int]:
    """Apply the missing migrations; returns the versions applied now."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        await conn.execute("CREATE SCHEMA IF NOT EXISTS mana_ai")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS mana_ai.schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        async with conn.cursor(row_factory=scalar_row) as cur:
            await cur.execute("SELECT version FROM mana_ai.schema_migrations")
            done = set(await cur.fetchall())
        for version, name, ddl in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(ddl.encode())
            await conn.execute(
                "INSERT INTO mana_ai.schema_migrations (version, name) VALUES (%s, %s)",
                (version, name),
            )
            applied_now.append(version)
            log.info("applied migration %d: %s", version, name)
    return applied_now
