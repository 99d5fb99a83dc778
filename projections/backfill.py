"""Loading `sync_changes` in the snapshot a new slot exported (initial load and rebuilds).

Invariant (no gap, no double-apply): the rows visible in the exported snapshot are exactly
the transactions that committed before the slot's consistent point, and the slot streams
exactly those that commit after it. So: create the slot, read the table in its snapshot,
then stream from the consistent point.
"""

from __future__ import annotations

from psycopg import AsyncConnection, sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader

from core import sync_changes as sc
from core.errors import SetupError
from core.failpoints import FailPoints
from core.lsn import Lsn
from projections.projector import Outcome, Projector

_FETCH = 5000


class _BytesLoader(Loader):
    """Text columns as raw bytes: the same form the replication stream delivers."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


def load_query() -> sql.Composed:
    cols = [sql.SQL("{}::text").format(sql.Identifier(c)) for c in sc.COLUMNS]
    return sql.SQL(
        "SELECT {cols} FROM {table} WHERE app_id = {app} AND table_name IN ({m}, {a})"
    ).format(
        cols=sql.SQL(", ").join(cols),
        table=sql.Identifier(sc.SOURCE_SCHEMA, sc.SOURCE_TABLE),
        app=sql.Literal(sc.APP_ID),
        m=sql.Literal(sc.MISSIONS_TABLE),
        a=sql.Literal(sc.AGENTS_TABLE),
    )


async def check_can_read_all(conn: AsyncConnection[tuple[object, ...]]) -> None:
    """Row-level security would silently hide other users' rows: refuse instead."""
    cur = await conn.execute(
        "SELECT r.rolsuper OR r.rolbypassrls, c.relrowsecurity, c.relforcerowsecurity,"
        " pg_get_userbyid(c.relowner) = current_user"
        " FROM pg_roles r, pg_class c"
        " WHERE r.rolname = current_user AND c.oid = to_regclass(%s)",
        (sc.QUALIFIED_NAME,),
    )
    row = await cur.fetchone()
    if row is None:
        raise SetupError(
            f"table {sc.QUALIFIED_NAME} does not exist",
            fix="point DATABASE_URL at the sync service's database "
            "(for development: mission-runner dev-schema)",
        )
    bypass, rls, forced, owner = (bool(v) for v in row)
    if rls and not bypass and (forced or not owner):
        user = conn.info.user
        raise SetupError(
            f"role {user!r} cannot read every user's rows of sync_changes: row-level security"
            " applies and the role lacks BYPASSRLS",
            fix=f"ALTER ROLE {user} BYPASSRLS;  (needed for the initial load and rebuilds)",
        )


async def load_table(
    conn: AsyncConnection[tuple[object, ...]],
    projector: Projector,
    *,
    snapshot_name: str | None,
    lsn: Lsn,
    now_us: int,
    failpoints: FailPoints | None = None,
) -> Outcome:
    """Merge every ai mission/agent row visible in the snapshot into the projector's stores.

    `conn` must be a fresh connection with no open transaction. Rows are applied as of `lsn`
    (the slot's consistent point). Dead letters are returned in the outcome.
    """
    await check_can_read_all(conn)
    outcome = Outcome()
    idx = tuple(range(len(sc.COLUMNS)))
    await conn.execute("SET TIME ZONE 'UTC'")
    await conn.execute("SET datestyle = 'ISO'")
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot_name is not None:
            await conn.execute(
                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
            )
        if failpoints is not None:
            await failpoints.passing("load-snapshot")  # tests: write while it is open
        async with conn.cursor(name="mission_runner_load") as cur:
            cur.adapters.register_loader("text", _BytesLoader)
            await cur.execute(load_query())
            while True:
                rows = await cur.fetchmany(_FETCH)
                if not rows:
                    break
                projector.apply_loaded(rows, idx, lsn, now_us, outcome)
    return outcome
