"""Reading the facts `mission_runner.checks` looks at, and enforcing the checks at start.

Every query reads catalogs and privilege functions only, so a role lacking a privilege is
described rather than refused (nothing here needs USAGE on a schema it asks about).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from core import sync_changes as sc
from mission_runner import checks
from mission_runner.checks import Check, Facts, Role, Rule, SourceTable
from mission_runner.migrations import schema_state
from mission_runner.settings import Settings
from stream import slots

log = logging.getLogger(__name__)

Conn = AsyncConnection[tuple[object, ...]]


async def _row(
    conn: Conn, query: str, params: tuple[object, ...] | None = None
) -> tuple[object, ...]:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row


async def read_role(conn: Conn) -> Role:
    user, database, superuser, replication, bypassrls = await _row(
        conn,
        "SELECT current_user, current_database(), rolsuper, rolreplication, rolbypassrls"
        " FROM pg_roles WHERE rolname = current_user",
    )
    return Role(str(user), str(database), bool(superuser), bool(replication), bool(bypassrls))


async def read_source_table(conn: Conn) -> SourceTable:
    cur = await conn.execute(
        "SELECT c.oid IS NOT NULL, has_schema_privilege(n.oid, 'USAGE'),"
        " has_schema_privilege(n.oid, 'CREATE'),"
        " coalesce(has_table_privilege(c.oid, 'SELECT'), false),"
        " coalesce(has_table_privilege(c.oid, 'INSERT'), false),"
        " coalesce(pg_has_role(c.relowner, 'USAGE'), false),"
        " coalesce(c.relrowsecurity, false), coalesce(c.relforcerowsecurity, false)"
        " FROM pg_namespace n"
        " LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %s"
        " WHERE n.nspname = %s",
        (sc.SOURCE_TABLE, sc.SOURCE_SCHEMA),
    )
    row = await cur.fetchone()
    if row is None:  # not even the schema
        return SourceTable(exists=False, schema_usage=False)
    return SourceTable(*(bool(v) for v in row))


async def read_facts(conn: Conn, settings: Settings) -> Facts:
    """Everything the checks look at, as this connection's role sees it."""
    role = await read_role(conn)
    table = await read_source_table(conn)
    version = conn.info.server_version
    async with conn.cursor(row_factory=dict_row) as server:
        await server.execute(
            "SELECT current_setting('max_replication_slots')::int AS max_slots,"
            " (SELECT count(*) FROM pg_replication_slots)::int AS used_slots,"
            " current_setting('max_wal_senders')::int AS max_senders,"
            " (SELECT count(*) FROM pg_stat_replication)::int AS used_senders,"
            " current_setting('wal_level') AS wal_level,"
            " current_setting('max_slot_wal_keep_size') AS keep,"
            " (SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout')"
            " AS timeout_ms"
        )
        settings_row = await server.fetchone()
    assert settings_row is not None
    cur = await conn.execute(
        "SELECT p.oid::regprocedure::text, has_function_privilege(p.oid, 'EXECUTE')"
        " FROM pg_proc p WHERE p.proname = 'pg_logical_emit_message'"
        " AND p.pronamespace = 'pg_catalog'::regnamespace AND p.proargtypes[2] = 'text'::regtype"
    )
    emit = await cur.fetchone()
    # get_publication resolves the table by name, which needs USAGE on its schema.
    publication = (
        await slots.get_publication(conn, settings.publication) if table.schema_usage else None
    )
    return Facts(
        server_version=version,
        wal_level=str(settings_row["wal_level"]),
        role=role,
        table=table,
        schema=await schema_state(conn),
        publication_name=settings.publication,
        publication=publication,
        publication_ddl=slots.publication_ddl(settings.publication, version).as_string(conn),
        slot_name=settings.slot,
        slot=await slots.get_slot(conn, settings.slot),
        max_slots=int(settings_row["max_slots"]),
        used_slots=int(settings_row["used_slots"]),
        max_senders=int(settings_row["max_senders"]),
        used_senders=int(settings_row["used_senders"]),
        wal_keep_size=str(settings_row["keep"]),
        sender_timeout_ms=int(settings_row["timeout_ms"]),
        status_interval=settings.status_interval,
        emit_function=None if emit is None else str(emit[0]),
        emit_allowed=emit is not None and bool(emit[1]),
    )


async def require(conn: Conn, settings: Settings, rules: Sequence[Rule]) -> list[Check]:
    """Run `rules` for a command about to start: raise `checks.SetupRefused` for the
    failures that stop it, log the rest that are not ok, and return every result."""
    results = checks.evaluate(await read_facts(conn, settings), rules)
    refused = checks.refusal(results)
    if refused is not None:
        raise refused
    for c in results:
        if c.result != checks.OK:
            log.warning("%s (fix: %s)", c.problem, c.fix)
    return results
