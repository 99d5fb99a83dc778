"""Schema migrations for the `mana_ai` schema (ours; `sync_changes` is never touched here).

Migrations are ordered, idempotent, recorded in `mana_ai.schema_migrations`, and run at start
under a transaction-scoped advisory lock so two processes starting together do not race.
The schema and the migrations table are created only when missing, so a schema made for the
role by someone else needs no CREATE on the database. A migration the server refuses for a
reason of setup (by SQLSTATE: a privilege, a read-only server) is a `SetupError`: the one
`doctor` prints when its check of the schema sees the cause, else one naming the SQLSTATE.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import scalar_row

from core import pgerrors
from core.errors import SetupError
from mission_runner import checks
from mission_runner.checks import SCHEMA, OurSchema, OurTable, Role

log = logging.getLogger(__name__)

_LOCK_KEY = 0x6D616E615F6169  # "mana_ai"

TABLES = (
    "schema_migrations",
    "mission_snapshots",
    "agent_snapshots",
    "stream_checkpoint",
    "dead_letter",
    "dispatch_ledger",
    "token_usage",
)
"""Every table the migrations make in `mana_ai`."""

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "snapshots, checkpoint and dead letters",
        """
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


Conn = AsyncConnection[tuple[object, ...]]


async def _versions(conn: Conn) -> set[int] | None:
    """The versions recorded as applied; None when the table is missing."""
    cur = await conn.execute(
        "SELECT to_regclass('mana_ai.schema_migrations') IS NOT NULL"
        " FROM pg_namespace WHERE nspname = %s",
        (SCHEMA,),
    )
    row = await cur.fetchone()
    if not (row and row[0]):
        return None
    async with conn.cursor(row_factory=scalar_row) as versions:
        await versions.execute("SELECT version FROM mana_ai.schema_migrations")
        return set(await versions.fetchall())


async def schema_state(conn: Conn) -> OurSchema:
    """`mana_ai` as this role sees it, read without touching what it may not read."""
    cur = await conn.execute(
        "SELECT n.oid IS NOT NULL, has_database_privilege(current_database(), 'CREATE'),"
        " coalesce(has_schema_privilege(n.oid, 'USAGE'), false),"
        " coalesce(has_schema_privilege(n.oid, 'CREATE'), false)"
        " FROM (VALUES (1)) AS one LEFT JOIN pg_namespace n ON n.nspname = %s",
        (SCHEMA,),
    )
    row = await cur.fetchone()
    assert row is not None
    exists, create_in_database, usage, create = (bool(v) for v in row)
    if not exists:
        return OurSchema(exists=False, create_in_database=create_in_database)
    cur = await conn.execute(
        "SELECT c.relname, pg_has_role(c.relowner, 'USAGE'), has_table_privilege(c.oid, 'SELECT'),"
        " has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'UPDATE')"
        " AND has_table_privilege(c.oid, 'DELETE') AND has_table_privilege(c.oid, 'TRUNCATE')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')"
        " ORDER BY c.relname",
        (SCHEMA, list(TABLES)),
    )
    tables = tuple(
        OurTable(str(name), bool(owner), bool(read), bool(write))
        for name, owner, read, write in await cur.fetchall()
    )
    readable = usage and all(t.read for t in tables if t.name == "schema_migrations")
    applied = await _versions(conn) if readable else None
    pending = applied is None or any(v not in applied for v, _name, _ddl in MIGRATIONS)
    return OurSchema(True, create_in_database, usage, create, tables, pending)


async def migrate(conn: Conn) -> list[int]:
    """Apply the missing migrations; returns the versions applied now. SetupError when the
    server refuses one for a reason of setup (see the module docstring)."""
    applied_now: list[int] = []
    step = f"creating schema {SCHEMA}"
    try:
        async with conn.transaction():
            # Looked at under the lock: a process that started first has committed by then.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur = await conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (SCHEMA,))
            row = await cur.fetchone()
            if not (row and row[0]):
                await conn.execute("CREATE SCHEMA mana_ai")
            step = "creating mana_ai.schema_migrations"
            done = await _versions(conn)
            if done is None:
                await conn.execute(
                    "CREATE TABLE mana_ai.schema_migrations ("
                    " version int PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = set()
            for version, name, ddl in MIGRATIONS:
                if version in done:
                    continue
                step = f"migration {version} ({name})"
                await conn.execute(ddl.encode())
                await conn.execute(
                    "INSERT INTO mana_ai.schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                applied_now.append(version)
                log.info("applied migration %d: %s", version, name)
    except psycopg.Error as exc:
        sqlstate = pgerrors.sqlstate_of(exc)
        if sqlstate not in checks.REFUSED_SQLSTATES:
            raise
        raise await _refused(conn, exc, sqlstate, step) from exc
    return applied_now


async def _refused(conn: Conn, exc: psycopg.Error, sqlstate: str, step: str) -> SetupError:
    """The SetupError for a migration the server refused with `sqlstate`."""
    reason = f"{exc.diag.message_primary or type(exc).__name__} (SQLSTATE {sqlstate})"
    if sqlstate == checks.READ_ONLY:
        return SetupError(
            f"schema {SCHEMA}: {step} was refused, the server is read-only: {reason}",
            fix="point DATABASE_URL at the primary server",
        )
    cur = await conn.execute(
        "SELECT current_user, current_database(), rolsuper FROM pg_roles"
        " WHERE rolname = current_user"
    )
    row = await cur.fetchone()
    assert row is not None
    role = Role(user=str(row[0]), database=str(row[1]), superuser=bool(row[2]))
    check = checks.schema_check(role, await schema_state(conn))
    if check.result == checks.FAIL:
        return SetupError(check.problem, fix=check.fix)
    return SetupError(
        f"schema {SCHEMA}: {step} was refused: {reason}",
        fix=f"run mission-runner once as the owner of the database (or a superuser), then"
        f" grant role {role.user} what `mission-runner doctor` lists",
    )
