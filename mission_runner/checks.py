"""The checks of server and role, as pure functions of what the server reported (`Facts`).

One set of checks serves `mission-runner doctor` (which prints every result) and start-up
(which refuses to start on the failures that leave the service unable to work, with the
same problem line and fix). `mission_runner.preflight` reads the facts and enforces them.

Invariants:
- A check looks only at its `Facts`: no I/O, no clock, no logging.
- A failure that stops the start (`stops_start`) is one the service cannot get past by
  itself; a failure it rides out or repairs (a lost slot, no free slot or WAL sender yet, a
  short `wal_sender_timeout`) is reported and the service starts.
- A check that cannot apply (its object is missing, and another check says so) returns None.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core import sync_changes as sc
from core.errors import SetupError
from stream.slots import PublicationInfo, SlotInfo

OK, WARN, FAIL = "ok", "warn", "fail"

SCHEMA = "mana_ai"
INSUFFICIENT_PRIVILEGE, READ_ONLY = "42501", "25006"
REFUSED_SQLSTATES = frozenset({INSUFFICIENT_PRIVILEGE, READ_ONLY})
"""SQLSTATEs by which the server refuses us for a reason of setup: retrying will not help,
an operator has to change a grant or DATABASE_URL."""
STATUS_TABLES = ("stream_checkpoint", "mission_snapshots", "agent_snapshots", "dead_letter")
"""Our tables the `status` command reads."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    result: str
    detail: str
    fix: str | None = None
    stops_start: bool = False

    @property
    def problem(self) -> str:
        """The one line doctor prints after its mark, and start-up after `mission-runner:`."""
        return f"{self.name}: {self.detail}"


def _fail(name: str, detail: str, fix: str, *, stops_start: bool = True) -> Check:
    return Check(name, FAIL, detail, fix, stops_start)


@dataclass(frozen=True, slots=True)
class Role:
    user: str
    database: str
    superuser: bool = False
    replication: bool = False
    bypassrls: bool = False


@dataclass(frozen=True, slots=True)
class SourceTable:
    """`sync_changes` and its schema as this role sees them."""

    exists: bool
    schema_usage: bool = True
    schema_create: bool = False
    select: bool = False
    insert: bool = False
    owner: bool = False
    row_security: bool = False
    forced_row_security: bool = False


@dataclass(frozen=True, slots=True)
class OurTable:
    name: str
    owner: bool
    read: bool
    write: bool
    """INSERT, UPDATE, DELETE and TRUNCATE, all of them."""


@dataclass(frozen=True, slots=True)
class OurSchema:
    """The `mana_ai` schema as this role sees it (`mission_runner.migrations.schema_state`)."""

    exists: bool
    create_in_database: bool
    usage: bool = False
    create: bool = False
    tables: tuple[OurTable, ...] = ()
    pending: bool = True
    """Migrations remain to be applied (also when the role cannot read which were)."""


@dataclass(frozen=True, slots=True)
class Facts:
    """What the checks look at, read in one place (`mission_runner.preflight.read_facts`)."""

    server_version: int
    wal_level: str
    role: Role
    table: SourceTable
    schema: OurSchema
    publication_name: str
    publication: PublicationInfo | None
    publication_ddl: str
    slot_name: str
    slot: SlotInfo | None
    max_slots: int
    used_slots: int
    max_senders: int
    used_senders: int
    wal_keep_size: str
    sender_timeout_ms: int
    status_interval: float
    emit_function: str | None
    """The signature of `pg_logical_emit_message` with text content; None: not found."""
    emit_allowed: bool


Rule = Callable[[Facts], Check | None]

_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


def ident(name: str) -> str:
    """`name` as an SQL identifier in a fix a person pastes."""
    return name if _PLAIN.fullmatch(name) else '"' + name.replace('"', '""') + '"'


# -- server ---------------------------------------------------------------------------


def server_version(f: Facts) -> Check:
    v = f.server_version
    if v < 140000:
        return _fail(
            "server version",
            f"{v}: protocol version 2 needs 14+",
            "upgrade PostgreSQL to 15 or later",
        )
    if v < 150000:
        return Check(
            "server version",
            WARN,
            f"{v}: no publication row filter before 15; rows of every app are sent and"
            " dropped client-side",
            "upgrade to 15 or later",
        )
    return Check("server version", OK, str(v))


def wal_level(f: Facts) -> Check:
    if f.wal_level == "logical":
        return Check("wal_level", OK, "logical")
    return _fail(
        "wal_level", f.wal_level, "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
    )


def replication_privilege(f: Facts) -> Check:
    r = f.role
    if r.superuser or r.replication:
        return Check("REPLICATION privilege", OK, "superuser" if r.superuser else "granted")
    return _fail(
        "REPLICATION privilege",
        f"role {r.user} lacks it",
        f"ALTER ROLE {ident(r.user)} REPLICATION;",
    )


# -- sync_changes ---------------------------------------------------------------------


def source_table(f: Facts) -> Check | None:
    if f.table.exists:
        return None  # the privilege checks follow
    return _fail(
        "sync_changes",
        f"{sc.QUALIFIED_NAME} does not exist",
        "point DATABASE_URL at the sync service's database; for development run:"
        " mission-runner dev-schema",
    )


def table_privileges(f: Facts) -> Check | None:
    t, user = f.table, ident(f.role.user)
    if not t.exists:
        return None
    if not t.schema_usage:
        return _fail(
            "sync_changes privileges",
            f"role {f.role.user} lacks USAGE on schema {sc.SOURCE_SCHEMA}",
            f"GRANT USAGE ON SCHEMA {sc.SOURCE_SCHEMA} TO {user};"
            f" GRANT SELECT, INSERT ON {sc.QUALIFIED_NAME} TO {user};",
        )
    lacking = [name for name, held in (("SELECT", t.select), ("INSERT", t.insert)) if not held]
    if lacking:
        return _fail(
            "sync_changes privileges",
            f"role {f.role.user} lacks {' and '.join(lacking)} (it reads the log and appends"
            " iterations to it)",
            f"GRANT SELECT, INSERT ON {sc.QUALIFIED_NAME} TO {user};",
        )
    return Check("sync_changes privileges", OK, "SELECT, INSERT")


def row_security(f: Facts) -> Check | None:
    t, r = f.table, f.role
    if not t.exists:
        return None
    if (
        t.row_security
        and not (r.superuser or r.bypassrls)
        and (t.forced_row_security or not t.owner)
    ):
        return _fail(
            "read every user's rows",
            "row-level security hides other users' rows from this role; the initial load and"
            " rebuilds would see nothing",
            f"ALTER ROLE {ident(r.user)} BYPASSRLS;",
        )
    return Check(
        "read every user's rows", OK, "superuser" if r.superuser else "BYPASSRLS or no RLS"
    )


def publication(f: Facts) -> Check | None:
    """The conditions `stream.slots.ensure_publication` refuses, each with its own fix."""
    name, pub, table = f.publication_name, f.publication, sc.QUALIFIED_NAME
    if not (f.table.exists and f.table.schema_usage):
        return None
    set_insert_only = f"ALTER PUBLICATION {ident(name)} SET (publish = 'insert');"
    if pub is None:
        if f.role.superuser or f.table.owner:
            return Check("publication", OK, f"{name} missing; will be created at start")
        return _fail(
            "publication",
            f"{name} missing and role {f.role.user} does not own {table}, so it cannot create it",
            f"as the table owner run: {f.publication_ddl}",
        )
    if not pub.has_table:
        where = " WHERE (app_id = 'ai')" if f.server_version >= 150000 else ""
        first = set_insert_only + " " if pub.updates or pub.deletes else ""
        return _fail(
            "publication",
            f"{name} does not include {table}",
            f"{first}ALTER PUBLICATION {ident(name)} ADD TABLE {table}{where};",
        )
    if not pub.inserts:
        return _fail("publication", f"{name} does not publish inserts", set_insert_only)
    if pub.row_filter is not None and (pub.updates or pub.deletes):
        return _fail(
            "publication",
            f"{name} has a row filter and publishes updates/deletes: other services' DELETEs on"
            " sync_changes would fail",
            set_insert_only,
        )
    if pub.columns is not None and (missing := sorted(set(sc.COLUMNS) - set(pub.columns))):
        return _fail(
            "publication",
            f"{name} does not send the columns {', '.join(missing)}",
            f"DROP PUBLICATION {ident(name)}; then let mission-runner create it, or run:"
            f" {f.publication_ddl}",
        )
    filtered = f", filter {pub.row_filter}" if pub.row_filter else ", no row filter"
    return Check("publication", OK, f"{name}: inserts{filtered}")


# -- slot and capacity ------------------------------------------------------------------


def replication_slot(f: Facts) -> Check | None:
    slot = f.slot
    if slot is None:
        return None  # `free_slots` reports whether one can be created
    if slot.plugin != "pgoutput" or slot.database != f.role.database:
        return _fail(
            "replication slot",
            f"{slot.name!r} exists but is not a pgoutput slot of database {f.role.database!r}"
            f" (plugin {slot.plugin!r}, database {slot.database!r})",
            "set MISSION_RUNNER_SLOT to an unused name, or drop that slot",
        )
    state = f"exists, wal_status {slot.wal_status}, " + (
        f"active for PID {slot.active_pid}" if slot.active else "inactive"
    )
    if slot.lost:
        return _fail(
            "replication slot",
            state,
            "mission-runner rebuilds a lost slot by itself at start",
            stops_start=False,
        )
    return Check("replication slot", OK, state)


def free_slots(f: Facts) -> Check | None:
    if f.slot is not None:
        return None
    detail = f"{f.used_slots} of {f.max_slots} in use"
    if f.max_slots - f.used_slots < 1:
        return _fail(
            "replication slots free",
            detail,
            "drop unused slots, or raise max_replication_slots and restart",
            stops_start=False,
        )
    return Check("replication slots free", OK, detail)


def free_senders(f: Facts) -> Check:
    detail = f"{f.used_senders} of {f.max_senders} in use"
    if f.max_senders - f.used_senders < 1:
        return _fail(
            "WAL senders free", detail, "raise max_wal_senders and restart", stops_start=False
        )
    return Check("WAL senders free", OK, detail)


def wal_keep_size(f: Facts) -> Check:
    if f.wal_keep_size in {"-1", "-1MB"}:
        return Check(
            "max_slot_wal_keep_size",
            WARN,
            "unlimited: a consumer that stays down retains WAL until the disk fills",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();  (a slot"
            " past it is invalidated and mission-runner rebuilds from the table)",
        )
    return Check("max_slot_wal_keep_size", OK, f.wal_keep_size)


def sender_timeout(f: Facts) -> Check:
    seconds = f.sender_timeout_ms / 1000
    if seconds == 0:
        return Check(
            "wal_sender_timeout",
            WARN,
            "0: dead consumers are never detected",
            "ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT pg_reload_conf();",
        )
    if seconds < 2 * f.status_interval:
        return _fail(
            "wal_sender_timeout",
            f"{seconds:g} s is less than twice MISSION_RUNNER_STATUS_INTERVAL"
            f" ({f.status_interval:g} s)",
            "lower MISSION_RUNNER_STATUS_INTERVAL or raise wal_sender_timeout",
            stops_start=False,
        )
    return Check("wal_sender_timeout", OK, f"{seconds:g} s")


# -- what the service writes ------------------------------------------------------------


def heartbeat(f: Facts) -> Check:
    if f.emit_allowed:
        return Check("heartbeat", OK, "may call pg_logical_emit_message")
    function = f.emit_function or "pg_logical_emit_message(boolean, text, text)"
    return _fail(
        "heartbeat",
        "cannot call pg_logical_emit_message (catch-up markers and heartbeats need it)",
        f"GRANT EXECUTE ON FUNCTION {function} TO {ident(f.role.user)};",
    )


def schema_check(role: Role, s: OurSchema) -> Check:
    """Whether the role can migrate and use `mana_ai` (also run when a migration fails)."""
    name, user = f"schema {SCHEMA}", ident(role.user)
    if not s.exists:
        if role.superuser or s.create_in_database:
            return Check(name, OK, "missing; created at start")
        return _fail(
            name,
            "missing and cannot be created",
            f"GRANT CREATE ON DATABASE {ident(role.database)} TO {user};",
        )
    lacking = [
        p for p, held in (("USAGE", s.usage), ("CREATE", s.create or not s.pending)) if not held
    ]
    if lacking:
        return _fail(
            name,
            f"exists and role {role.user} lacks {' and '.join(lacking)} on it",
            f"GRANT {', '.join(lacking)} ON SCHEMA {SCHEMA} TO {user};",
        )
    if unusable := [t.name for t in s.tables if not (t.read and t.write)]:
        return _fail(
            name,
            f"role {role.user} may not read and write "
            + ", ".join(f"{SCHEMA}.{t}" for t in unusable),
            "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA"
            f" {SCHEMA} TO {user};",
        )
    # Migrations alter our tables, which only their owner may do.
    if s.pending and not role.superuser and (foreign := [t.name for t in s.tables if not t.owner]):
        return _fail(
            name,
            f"migrations are due and role {role.user} does not own "
            + ", ".join(f"{SCHEMA}.{t}" for t in foreign),
            " ".join(f"ALTER TABLE {SCHEMA}.{t} OWNER TO {user};" for t in foreign),
        )
    return Check(name, OK, "migrations due" if s.pending else "up to date")


def schema(f: Facts) -> Check:
    return schema_check(f.role, f.schema)


# -- the commands that do not run the service -------------------------------------------


def status_access(f: Facts) -> Check | None:
    """What `status` reads of ours, when the schema exists."""
    s, user = f.schema, ident(f.role.user)
    if not s.exists:
        return None
    fix = (
        f"GRANT USAGE ON SCHEMA {SCHEMA} TO {user};"
        f" GRANT SELECT ON ALL TABLES IN SCHEMA {SCHEMA} TO {user};"
    )
    if not s.usage:
        return _fail("read mana_ai", f"role {f.role.user} lacks USAGE on schema {SCHEMA}", fix)
    unreadable = [t.name for t in s.tables if t.name in STATUS_TABLES and not t.read]
    if unreadable:
        tables = ", ".join(f"{SCHEMA}.{t}" for t in unreadable)
        return _fail("read mana_ai", f"role {f.role.user} may not read {tables}", fix)
    return Check("read mana_ai", OK, "USAGE, SELECT")


def dev_schema(f: Facts) -> Check:
    """What `dev-schema` needs: to create the table, or to own it (it alters it)."""
    t, r = f.table, f.role
    if not (t.schema_create or r.superuser):
        return _fail(
            "dev schema",
            f"role {r.user} may not create tables in schema {sc.SOURCE_SCHEMA}",
            "run it as the owner of the database (development databases only)",
        )
    if t.exists and not (t.owner or r.superuser):
        return _fail(
            "dev schema",
            f"{sc.QUALIFIED_NAME} exists and role {r.user} does not own it",
            f"run it as the owner of {sc.QUALIFIED_NAME} (development databases only)",
        )
    return Check("dev schema", OK, "can create it")


SERVICE: tuple[Rule, ...] = (
    server_version,
    wal_level,
    replication_privilege,
    source_table,
    table_privileges,
    row_security,
    publication,
    replication_slot,
    free_slots,
    free_senders,
    wal_keep_size,
    sender_timeout,
    heartbeat,
    schema,
)
"""What the service needs, in the order doctor prints it."""
STATUS: tuple[Rule, ...] = (status_access,)
DEV_SCHEMA: tuple[Rule, ...] = (dev_schema,)


def evaluate(facts: Facts, rules: Sequence[Rule]) -> list[Check]:
    """Every rule that applies, in order."""
    return [check for rule in rules if (check := rule(facts)) is not None]


class SetupRefused(SetupError):
    """Every failure that stops the start; `problem` and `fix` are the first one's."""

    def __init__(self, failed: Sequence[Check]) -> None:
        first = failed[0]
        super().__init__(first.problem, fix=first.fix)
        self.checks = tuple(failed)

    def __str__(self) -> str:
        return "\n".join(f"{c.problem}\n  fix: {c.fix}" for c in self.checks)


def refusal(checks: Sequence[Check]) -> SetupRefused | None:
    """The error that stops the start (every failure that stops it), or None."""
    failed = [c for c in checks if c.result == FAIL and c.stops_start]
    return SetupRefused(failed) if failed else None
