"""Replication slot and publication management over a normal (non-replication) connection.

The publication carries inserts only: other services hard-delete old `sync_changes` rows,
and a publication with a row filter that also published deletes would make those DELETEs
fail (`app_id` is not in the replica identity). On PostgreSQL 15+ it filters rows on the
server (`WHERE (app_id = 'ai')`), so rows of other apps never cross the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import class_row, scalar_row

from core import sync_changes as sc
from core.errors import SetupError
from core.lsn import Lsn
from core.sync_changes import COLUMNS

ROW_FILTER_MIN_VERSION = 150000


@dataclass(frozen=True, slots=True)
class SlotInfo:
    name: str
    plugin: str | None
    database: str | None
    temporary: bool
    active: bool
    active_pid: int | None
    restart_lsn: Lsn | None
    confirmed_flush_lsn: Lsn | None
    wal_status: str | None
    safe_wal_size: int | None

    @property
    def lost(self) -> bool:
        """Invalidated: the WAL it needs is gone, or it was never usable for decoding."""
        return self.wal_status == "lost" or self.confirmed_flush_lsn is None


@dataclass(frozen=True, slots=True)
class SlotLag:
    """Lag as the server sees it, read from the slot (works with no consumer connected)."""

    current_lsn: Lsn
    confirmed_flush_lsn: Lsn | None
    restart_lsn: Lsn | None
    lag_bytes: int | None
    retained_bytes: int | None
    safe_wal_size: int | None
    wal_status: str | None
    active: bool
    spill_bytes: int | None
    stream_bytes: int | None


def _lsn(value: str | None) -> Lsn | None:
    return None if value is None else Lsn.parse(value)


async def current_wal_lsn(conn: AsyncConnection[tuple[object, ...]]) -> Lsn:
    """The server's current WAL write position."""
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute("SELECT pg_current_wal_lsn()::text")
        text = await cur.fetchone()
    assert isinstance(text, str)
    return Lsn.parse(text)


@dataclass(frozen=True, slots=True)
class _SlotRow:
    slot_name: str
    plugin: str | None
    database: str | None
    temporary: bool
    active: bool
    active_pid: int | None
    restart_lsn: str | None
    confirmed_flush_lsn: str | None
    wal_status: str | None
    safe_wal_size: int | None


async def get_slot(conn: AsyncConnection[tuple[object, ...]], name: str) -> SlotInfo | None:
    async with conn.cursor(row_factory=class_row(_SlotRow)) as cur:
        await cur.execute(
            "SELECT slot_name, plugin, database, temporary, active, active_pid,"
            " restart_lsn::text, confirmed_flush_lsn::text, wal_status, safe_wal_size"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        )
        row = await cur.fetchone()
    if row is None:
        return None
    return SlotInfo(
        name=row.slot_name,
        plugin=row.plugin,
        database=row.database,
        temporary=row.temporary,
        active=row.active,
        active_pid=row.active_pid,
        restart_lsn=_lsn(row.restart_lsn),
        confirmed_flush_lsn=_lsn(row.confirmed_flush_lsn),
        wal_status=row.wal_status,
        safe_wal_size=row.safe_wal_size,
    )


async def check_slot_usable(conn: AsyncConnection[tuple[object, ...]], slot: SlotInfo) -> None:
    """Raise if the slot exists but belongs to something else."""
    dbname = conn.info.dbname
    if slot.plugin != "pgoutput" or slot.database != dbname:
        raise SetupError(
            f"replication slot {slot.name!r} exists but is not a pgoutput slot of database "
            f"{dbname!r} (plugin {slot.plugin!r}, database {slot.database!r})",
            slot=slot.name,
            fix="set MISSION_RUNNER_SLOT to an unused name, or drop that slot",
        )


async def drop_slot(conn: AsyncConnection[tuple[object, ...]], name: str) -> None:
    await conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
        (name,),
    )


@dataclass(frozen=True, slots=True)
class _LagRow:
    current: str
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    lag_bytes: int | None
    retained_bytes: int | None
    safe_wal_size: int | None
    wal_status: str | None
    active: bool
    spill_bytes: int | None
    stream_bytes: int | None


async def slot_lag(conn: AsyncConnection[tuple[object, ...]], name: str) -> SlotLag | None:
    stats = ", NULL::bigint AS spill_bytes, NULL::bigint AS stream_bytes"
    join = ""
    if conn.info.server_version >= 140000:
        stats = ", st.spill_bytes, st.stream_bytes"
        join = " LEFT JOIN pg_stat_replication_slots st ON st.slot_name = s.slot_name"
    async with conn.cursor(row_factory=class_row(_LagRow)) as cur:
        await cur.execute(
            "SELECT pg_current_wal_lsn()::text AS current,"
            " s.confirmed_flush_lsn::text, s.restart_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_bytes,"
            " s.safe_wal_size, s.wal_status, s.active"
            + stats
            + " FROM pg_replication_slots s"
            + join
            + " WHERE s.slot_name = %s",
            (name,),
        )
        row = await cur.fetchone()
    if row is None:
        return None
    return SlotLag(
        current_lsn=Lsn.parse(row.current),
        confirmed_flush_lsn=_lsn(row.confirmed_flush_lsn),
        restart_lsn=_lsn(row.restart_lsn),
        lag_bytes=row.lag_bytes,
        retained_bytes=row.retained_bytes,
        safe_wal_size=row.safe_wal_size,
        wal_status=row.wal_status,
        active=row.active,
        spill_bytes=row.spill_bytes,
        stream_bytes=row.stream_bytes,
    )


def publication_ddl(name: str, version: int) -> sql.Composed:
    table = sql.Identifier(sc.SOURCE_SCHEMA, sc.SOURCE_TABLE)
    if version >= ROW_FILTER_MIN_VERSION:
        return sql.SQL(
            "CREATE PUBLICATION {} FOR TABLE {} ({}) WHERE (app_id = 'ai')"
            " WITH (publish = 'insert')"
        ).format(sql.Identifier(name), table, sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))
    return sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(
        sql.Identifier(name), table
    )


@dataclass(frozen=True, slots=True)
class PublicationInfo:
    name: str
    inserts: bool
    updates: bool
    deletes: bool
    truncates: bool
    has_table: bool
    row_filter: str | None
    columns: tuple[str, ...] | None = None  # the column list; None: every column


async def source_table_exists(conn: AsyncConnection[tuple[object, ...]]) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{sc.QUALIFIED_NAME}",))
    row = await cur.fetchone()
    return bool(row and row[0])


@dataclass(frozen=True, slots=True)
class _PublicationRow:
    pubinsert: bool
    pubupdate: bool
    pubdelete: bool
    pubtruncate: bool
    has_table: bool
    row_filter: str | None
    columns: list[str] | None


async def get_publication(
    conn: AsyncConnection[tuple[object, ...]], name: str
) -> PublicationInfo | None:
    qual, cols = "NULL", "NULL"
    if conn.info.server_version >= 150000:
        qual = "pg_get_expr(pr.prqual, pr.prrelid)"
        cols = (
            "(SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a"
            " WHERE a.attrelid = pr.prrelid AND a.attnum = ANY (pr.prattrs))"
        )
    async with conn.cursor(row_factory=class_row(_PublicationRow)) as cur:
        await cur.execute(
            "SELECT p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate,"
            " (p.puballtables OR pr.prrelid IS NOT NULL) AS has_table, "
            + qual
            + " AS row_filter, "
            + cols
            + " AS columns FROM pg_publication p"
            " LEFT JOIN pg_publication_rel pr ON pr.prpubid = p.oid"
            "  AND pr.prrelid = to_regclass(%s)"
            " WHERE p.pubname = %s",
            (sc.QUALIFIED_NAME, name),
        )
        row = await cur.fetchone()
    if row is None:
        return None
    return PublicationInfo(
        name=name,
        inserts=row.pubinsert,
        updates=row.pubupdate,
        deletes=row.pubdelete,
        truncates=row.pubtruncate,
        has_table=row.has_table,
        row_filter=row.row_filter,
        columns=None if row.columns is None else tuple(row.columns),
    )


async def ensure_publication(
    conn: AsyncConnection[tuple[object, ...]], name: str
) -> PublicationInfo:
    """Create the publication when missing; refuse one that would break the source table."""
    info = await get_publication(conn, name)
    version = conn.info.server_version
    if info is None:
        ddl = publication_ddl(name, version)
        try:
            await conn.execute(ddl)
        except psycopg.errors.UndefinedTable:
            raise SetupError(
                f"table {sc.QUALIFIED_NAME} does not exist",
                fix="point DATABASE_URL at the sync service's database "
                "(for development: mission-runner dev-schema)",
            ) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SetupError(
                f"cannot create publication {name!r}: {exc}",
                fix=f"as the owner of {sc.QUALIFIED_NAME} run: {ddl.as_string(conn)}",
            ) from None
        info = await get_publication(conn, name)
        assert info is not None
        return info
    fix = f"DROP PUBLICATION {name}; then let mission-runner create it, or run: " + publication_ddl(
        name, version
    ).as_string(conn)
    if not info.has_table:
        raise SetupError(f"publication {name!r} does not include {sc.QUALIFIED_NAME}", fix=fix)
    if not info.inserts:
        raise SetupError(f"publication {name!r} does not publish inserts", fix=fix)
    if info.columns is not None and (missing := set(COLUMNS) - set(info.columns)):
        raise SetupError(
            f"publication {name!r} does not send the columns {sorted(missing)}", fix=fix
        )
    if info.row_filter is not None and (info.updates or info.deletes):
        raise SetupError(
            f"publication {name!r} has a row filter and publishes updates or deletes: "
            "DELETEs on sync_changes by other services would fail",
            fix=fix,
        )
    return info
