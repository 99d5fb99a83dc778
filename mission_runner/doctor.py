"""`mission-runner doctor`: preflight checks of the server and role, each with its fix."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from core import sync_changes as sc
from mission_runner.settings import Settings
from stream import slots

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    result: str
    detail: str
    fix: str | None = None


async def _one(
    conn: psycopg.AsyncConnection[tuple[object, ...]], query: str, params: tuple[object, ...] = ()
) -> tuple[object, ...]:
    cur = await conn.execute(query.encode() if not params else query, params or None)
    row = await cur.fetchone()
    assert row is not None
    return row


async def run_checks(
    conn: psycopg.AsyncConnection[tuple[object, ...]], settings: Settings
) -> list[Check]:
    checks: list[Check] = []
    version = conn.info.server_version
    user = conn.info.user
    table = f"{sc.QUALIFIED_NAME}"

    if version < 140000:
        checks.append(
            Check(
                "server version",
                FAIL,
                f"{version}: protocol version 2 needs 14+",
                "upgrade PostgreSQL to 15 or later",
            )
        )
    elif version < 150000:
        checks.append(
            Check(
                "server version",
                WARN,
                f"{version}: no publication row filter before 15; rows of every"
                " app are sent and dropped client-side",
                "upgrade to 15 or later",
            )
        )
    else:
        checks.append(Check("server version", OK, str(version)))

    (wal_level,) = await _one(conn, "SHOW wal_level")
    checks.append(
        Check("wal_level", OK, "logical")
        if wal_level == "logical"
        else Check(
            "wal_level",
            FAIL,
            str(wal_level),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        )
    )

    rolsuper, rolrepl, rolbypass = await _one(
        conn,
        "SELECT rolsuper, rolreplication, rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    if rolsuper or rolrepl:
        checks.append(Check("REPLICATION privilege", OK, "superuser" if rolsuper else "granted"))
    else:
        checks.append(
            Check(
                "REPLICATION privilege",
                FAIL,
                f"role {user} lacks it",
                f"ALTER ROLE {user} REPLICATION;",
            )
        )

    (exists,) = await _one(conn, "SELECT to_regclass(%s) IS NOT NULL", (table,))
    if not exists:
        checks.append(
            Check(
                "sync_changes",
                FAIL,
                f"{table} does not exist",
                "point DATABASE_URL at the sync service's database; for development"
                " run: mission-runner dev-schema",
            )
        )
    else:
        rls, forced, owner, can_select = await _one(
            conn,
            "SELECT relrowsecurity, relforcerowsecurity,"
            " pg_get_userbyid(relowner) = current_user, has_table_privilege(%s, 'SELECT')"
            " FROM pg_class WHERE oid = to_regclass(%s)",
            (table, table),
        )
        if not can_select:
            checks.append(
                Check(
                    "read sync_changes",
                    FAIL,
                    "no SELECT privilege",
                    f"GRANT SELECT, INSERT ON {table} TO {user};",
                )
            )
        elif rls and not (rolsuper or rolbypass) and (forced or not owner):
            checks.append(
                Check(
                    "read every user's rows",
                    FAIL,
                    "row-level security hides other users' rows from this role;"
                    " the initial load and rebuilds would see nothing",
                    f"ALTER ROLE {user} BYPASSRLS;",
                )
            )
        else:
            checks.append(
                Check(
                    "read every user's rows", OK, "superuser" if rolsuper else "BYPASSRLS or no RLS"
                )
            )
        pub = await slots.get_publication(conn, settings.publication)
        if pub is None:
            if rolsuper or owner:
                checks.append(
                    Check(
                        "publication",
                        OK,
                        f"{settings.publication} missing; will be created at start",
                    )
                )
            else:
                checks.append(
                    Check(
                        "publication",
                        FAIL,
                        f"{settings.publication} missing and role {user} does not own"
                        f" {table}, so it cannot create it",
                        "as the table owner run: "
                        + slots.publication_ddl(settings.publication, version).as_string(conn),
                    )
                )
        elif pub.row_filter is not None and (pub.updates or pub.deletes):
            checks.append(
                Check(
                    "publication",
                    FAIL,
                    "has a row filter and publishes updates/deletes: other services'"
                    " DELETEs on sync_changes would fail",
                    f"ALTER PUBLICATION {settings.publication} SET (publish = 'insert');",
                )
            )
        elif not pub.has_table:
            checks.append(
                Check(
                    "publication",
                    FAIL,
                    f"does not include {table}",
                    f"ALTER PUBLICATION {settings.publication} ADD TABLE {table}"
                    " WHERE (app_id = 'ai');",
                )
            )
        else:
            checks.append(
                Check(
                    "publication",
                    OK,
                    f"{settings.publication}: inserts"
                    + (f", filter {pub.row_filter}" if pub.row_filter else ", no row filter"),
                )
            )

    (max_slots, used_slots) = await _one(
        conn,
        "SELECT current_setting('max_replication_slots')::int,"
        " (SELECT count(*) FROM pg_replication_slots)",
    )
    slot = await slots.get_slot(conn, settings.slot)
    if slot is not None:
        state = f"exists, wal_status {slot.wal_status}, " + (
            f"active for PID {slot.active_pid}" if slot.active else "inactive"
        )
        result = FAIL if slot.lost else OK
        checks.append(
            Check(
                "replication slot",
                result,
                state,
                "mission-runner rebuilds a lost slot by itself at start" if slot.lost else None,
            )
        )
    elif int(str(max_slots)) - int(str(used_slots)) < 1:
        checks.append(
            Check(
                "replication slots free",
                FAIL,
                f"{used_slots} of {max_slots} in use",
                "drop unused slots, or raise max_replication_slots and restart",
            )
        )
    else:
        checks.append(Check("replication slots free", OK, f"{used_slots} of {max_slots} in use"))

    (max_senders, used_senders) = await _one(
        conn,
        "SELECT current_setting('max_wal_senders')::int,"
        " (SELECT count(*) FROM pg_stat_replication)",
    )
    if int(str(max_senders)) - int(str(used_senders)) < 1:
        checks.append(
            Check(
                "WAL senders free",
                FAIL,
                f"{used_senders} of {max_senders} in use",
                "raise max_wal_senders and restart",
            )
        )
    else:
        checks.append(Check("WAL senders free", OK, f"{used_senders} of {max_senders} in use"))

    (keep,) = await _one(conn, "SHOW max_slot_wal_keep_size")
    if str(keep) in {"-1", "-1MB"}:
        checks.append(
            Check(
                "max_slot_wal_keep_size",
                WARN,
                "unlimited: a consumer that stays down retains WAL until the disk fills",
                "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT"
                " pg_reload_conf();  (a slot past it is invalidated and"
                " mission-runner rebuilds from the table)",
            )
        )
    else:
        checks.append(Check("max_slot_wal_keep_size", OK, str(keep)))

    (timeout_ms,) = await _one(
        conn, "SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout'"
    )
    timeout_s = int(str(timeout_ms)) / 1000
    if timeout_s == 0:
        checks.append(
            Check(
                "wal_sender_timeout",
                WARN,
                "0: dead consumers are never detected",
                "ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT pg_reload_conf();",
            )
        )
    elif timeout_s < 2 * settings.status_interval:
        checks.append(
            Check(
                "wal_sender_timeout",
                FAIL,
                f"{timeout_s:g} s is less than twice MISSION_RUNNER_STATUS_INTERVAL"
                f" ({settings.status_interval:g} s)",
                "lower MISSION_RUNNER_STATUS_INTERVAL or raise wal_sender_timeout",
            )
        )
    else:
        checks.append(Check("wal_sender_timeout", OK, f"{timeout_s:g} s"))

    (can_emit,) = await _one(
        conn,
        "SELECT coalesce(bool_or(has_function_privilege(oid, 'EXECUTE')), false)"
        " FROM pg_proc WHERE proname = 'pg_logical_emit_message'"
        " AND proargtypes[2] = 'text'::regtype",
    )
    checks.append(
        Check("heartbeat", OK, "may call pg_logical_emit_message")
        if can_emit
        else Check(
            "heartbeat",
            FAIL,
            "cannot call pg_logical_emit_message",
            f"GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO {user};",
        )
    )

    (can_create,) = await _one(
        conn,
        "SELECT has_database_privilege(current_database(), 'CREATE')"
        " OR to_regnamespace('mana_ai') IS NOT NULL",
    )
    checks.append(
        Check("schema mana_ai", OK, "exists or can be created")
        if can_create
        else Check(
            "schema mana_ai",
            FAIL,
            "missing and cannot be created",
            f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {user};",
        )
    )
    return checks


def format_checks(checks: list[Check]) -> str:
    marks = {OK: "[ok]  ", WARN: "[warn]", FAIL: "[FAIL]"}
    lines = []
    for c in checks:
        lines.append(f"{marks[c.result]} {c.name}: {c.detail}")
        if c.fix and c.result != OK:
            lines.append(f"         fix: {c.fix}")
    return "\n".join(lines)
