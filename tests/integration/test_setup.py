"""Setup problems at start: each command exits 2 with the problem and fix `doctor` prints.

Most tests run the service as a role that has everything it needs but one thing (the `role`
fixture: REPLICATION, BYPASSRLS, SELECT and INSERT on sync_changes, CREATE on the database,
the publication created by the table's owner), take that one thing away, and compare the
refusal at start with what `doctor` says about it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import conninfo, sql

from stream import slots
from tests.fix_pg import TestDatabase
from tests.fix_service import ROOT, service_env

pytestmark = pytest.mark.integration

STARTING = ["run", "catch-up", "rebuild", "replay --from-lsn 0/0"]
UNREACHABLE = "host=127.0.0.1 port=1 dbname=x connect_timeout=2"


@dataclass(frozen=True)
class Done:
    returncode: int | None  # None: still running at the timeout (then killed)
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(db: TestDatabase, command: str, *, dsn: str | None = None, timeout: float = 30) -> Done:
    env = service_env(db, HTTP_PORT="0", MISSION_RUNNER_CONNECT_RETRY="0")
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mission_runner.cli", *command.split()],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return Done(None, out, err)
    return Done(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class Role:
    name: str
    dsn: str


def execute(db: TestDatabase, *statements: str) -> None:
    with db.connect() as conn:
        for statement in statements:
            conn.execute(statement.encode())


@pytest.fixture
def role(db: TestDatabase) -> Iterator[Role]:
    """A role with everything the service needs, which does not own sync_changes."""
    name = f"{db.name}_role"
    with db.connect() as conn:
        ddl = slots.publication_ddl(db.publication, conn.info.server_version).as_string(conn)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN REPLICATION BYPASSRLS").format(sql.Identifier(name))
        )
        conn.execute(f"GRANT SELECT, INSERT ON public.sync_changes TO {name}".encode())
        conn.execute(f"GRANT CREATE ON DATABASE {db.name} TO {name}".encode())
        conn.execute(ddl.encode())
    try:
        yield Role(name, conninfo.make_conninfo(db.dsn, user=name))
    finally:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {name}".encode())
            conn.execute(f"DROP ROLE {name}".encode())


def doctor_failure(db: TestDatabase, check: str, dsn: str | None = None) -> tuple[str, str]:
    """The problem line and the fix `doctor` prints for the failing check `check`."""
    done = cli(db, "doctor", dsn=dsn)
    lines = done.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"[FAIL] {check}:"):
            fix = lines[i + 1].strip()
            assert fix.startswith("fix: "), done.stdout
            return line.removeprefix("[FAIL] "), fix.removeprefix("fix: ")
    raise AssertionError(f"doctor reports no failure of {check!r}:\n{done.output}")


def assert_refused(done: Done, problem: str, fix: str) -> None:
    assert done.returncode == 2, done.output
    assert problem in done.stderr, done.stderr
    assert f"fix: {fix}" in done.stderr, done.stderr
    assert "Traceback" not in done.output, done.output


# -- one test per problem: the service refuses to start, with doctor's words -------------


def test_replication_privilege(db: TestDatabase, role: Role) -> None:
    execute(db, f"ALTER ROLE {role.name} NOREPLICATION")
    problem, fix = doctor_failure(db, "REPLICATION privilege", role.dsn)
    assert fix == f"ALTER ROLE {role.name} REPLICATION;"
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)


def test_bypassrls_for_the_load(db: TestDatabase, role: Role) -> None:
    execute(db, f"ALTER ROLE {role.name} NOBYPASSRLS")
    problem, fix = doctor_failure(db, "read every user's rows", role.dsn)
    assert fix == f"ALTER ROLE {role.name} BYPASSRLS;"
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)


@pytest.mark.parametrize("privilege", ["SELECT", "INSERT"])
def test_privileges_on_sync_changes(db: TestDatabase, role: Role, privilege: str) -> None:
    execute(db, f"REVOKE {privilege} ON public.sync_changes FROM {role.name}")
    problem, fix = doctor_failure(db, "sync_changes privileges", role.dsn)
    assert privilege in problem
    assert fix == f"GRANT SELECT, INSERT ON public.sync_changes TO {role.name};"
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)


def test_execute_on_pg_logical_emit_message(db: TestDatabase, role: Role) -> None:
    with db.connect() as conn:
        for (function,) in conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname = 'pg_logical_emit_message'"
        ).fetchall():
            conn.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC".encode())
    problem, fix = doctor_failure(db, "heartbeat", role.dsn)
    assert fix.startswith("GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text")
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)
    execute(db, fix)  # the fix works as printed
    done = cli(db, "catch-up", dsn=role.dsn)
    assert done.returncode == 0, done.output


@pytest.mark.parametrize("command", STARTING)
def test_create_on_the_database_for_mana_ai(db: TestDatabase, role: Role, command: str) -> None:
    execute(db, f"REVOKE CREATE ON DATABASE {db.name} FROM {role.name}")
    problem, fix = doctor_failure(db, "schema mana_ai", role.dsn)
    assert fix == f"GRANT CREATE ON DATABASE {db.name} TO {role.name};"
    assert_refused(cli(db, command, dsn=role.dsn), problem, fix)


def test_a_schema_made_for_the_role_needs_no_create_on_the_database(
    db: TestDatabase, role: Role
) -> None:
    execute(
        db,
        f"REVOKE CREATE ON DATABASE {db.name} FROM {role.name}",
        f"CREATE SCHEMA mana_ai AUTHORIZATION {role.name}",
    )
    done = cli(db, "catch-up", dsn=role.dsn)
    assert done.returncode == 0, done.output
    assert "[FAIL]" not in cli(db, "doctor", dsn=role.dsn).stdout


def test_a_schema_of_another_role(db: TestDatabase, role: Role) -> None:
    execute(db, "CREATE SCHEMA mana_ai")
    problem, fix = doctor_failure(db, "schema mana_ai", role.dsn)
    assert fix == f"GRANT USAGE, CREATE ON SCHEMA mana_ai TO {role.name};"
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)


def test_tables_of_another_role(db: TestDatabase, role: Role) -> None:
    assert cli(db, "catch-up").returncode == 0  # as the superuser: it owns mana_ai
    execute(db, f"GRANT USAGE, CREATE ON SCHEMA mana_ai TO {role.name}")
    problem, fix = doctor_failure(db, "schema mana_ai", role.dsn)
    assert fix == (
        f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA mana_ai"
        f" TO {role.name};"
    )
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)
    execute(db, fix)  # with the grants, a migrated schema of another role is enough
    done = cli(db, "catch-up", dsn=role.dsn)
    assert done.returncode == 0, done.output


def test_a_migration_the_role_may_not_apply(db: TestDatabase, role: Role) -> None:
    # The checkpoint table as migration 1 made it, owned by another role: migration 3
    # alters it, which only its owner may do.
    execute(
        db,
        "CREATE SCHEMA mana_ai",
        f"GRANT USAGE, CREATE ON SCHEMA mana_ai TO {role.name}",
        "CREATE TABLE mana_ai.stream_checkpoint (slot_name text PRIMARY KEY,"
        " lsn pg_lsn NOT NULL, commit_time timestamptz,"
        " updated_at timestamptz NOT NULL DEFAULT now())",
        f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON mana_ai.stream_checkpoint"
        f" TO {role.name}",
    )
    problem, fix = doctor_failure(db, "schema mana_ai", role.dsn)
    assert fix == f"ALTER TABLE mana_ai.stream_checkpoint OWNER TO {role.name};"
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)


def test_the_migrations_own_refusal_is_a_setup_error(db: TestDatabase, role: Role) -> None:
    # What the checks cannot see is mapped by its SQLSTATE when the migration runs: here an
    # event trigger refuses the role's DDL with insufficient_privilege (42501).
    execute(
        db,
        "CREATE FUNCTION refuse_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF current_user = '{role.name}' THEN"
        " RAISE insufficient_privilege USING MESSAGE = 'no DDL here'; END IF; END $$",
        "CREATE EVENT TRIGGER refuse_ddl ON ddl_command_start EXECUTE FUNCTION refuse_ddl()",
    )
    try:
        done = cli(db, "run", dsn=role.dsn)
        assert done.returncode == 2, done.output
        assert "schema mana_ai: " in done.stderr and "(SQLSTATE 42501)" in done.stderr
        assert "fix: " in done.stderr
        assert "Traceback" not in done.output
    finally:
        execute(db, "DROP EVENT TRIGGER refuse_ddl")


def test_publication_missing_and_the_role_cannot_create_it(db: TestDatabase, role: Role) -> None:
    execute(db, f"DROP PUBLICATION {db.publication}")
    problem, fix = doctor_failure(db, "publication", role.dsn)
    assert fix.startswith(f'as the table owner run: CREATE PUBLICATION "{db.publication}"')
    assert_refused(cli(db, "run", dsn=role.dsn), problem, fix)


def test_publication_with_a_row_filter_that_publishes_deletes(db: TestDatabase) -> None:
    with db.connect() as conn:
        if conn.info.server_version < slots.ROW_FILTER_MIN_VERSION:
            pytest.skip("row filters need PostgreSQL 15")
        conn.execute(
            slots.publication_ddl(db.publication, conn.info.server_version).as_string(conn)
        )
        conn.execute(f"ALTER PUBLICATION {db.publication} SET (publish = 'insert, delete')")
    problem, fix = doctor_failure(db, "publication")
    assert fix == f"ALTER PUBLICATION {db.publication} SET (publish = 'insert');"
    assert_refused(cli(db, "run"), problem, fix)


def test_publication_without_sync_changes(db: TestDatabase) -> None:
    execute(
        db,
        "CREATE TABLE other (id int PRIMARY KEY)",
        f"CREATE PUBLICATION {db.publication} FOR TABLE other",
    )
    problem, fix = doctor_failure(db, "publication")
    assert "does not include public.sync_changes" in problem
    assert_refused(cli(db, "run"), problem, fix)


def test_without_sync_changes(pg_db: TestDatabase) -> None:
    problem, fix = doctor_failure(pg_db, "sync_changes")
    assert "mission-runner dev-schema" in fix
    assert_refused(cli(pg_db, "run"), problem, fix)
    with pg_db.connect() as conn:  # refused before our schema was made
        assert conn.execute("SELECT to_regnamespace('mana_ai')").fetchone() == (None,)


@pytest.mark.parametrize("command", [*STARTING, "demo --allow-database-url --duration 10"])
def test_a_slot_of_something_else(db: TestDatabase, command: str) -> None:
    execute(db, f"SELECT pg_create_logical_replication_slot('{db.slot}', 'test_decoding')")
    problem, fix = doctor_failure(db, "replication slot")
    assert "test_decoding" in problem
    assert fix == "set MISSION_RUNNER_SLOT to an unused name, or drop that slot"
    assert_refused(cli(db, command), problem, fix)


def test_warnings_do_not_stop_the_start(db: TestDatabase) -> None:
    doctor = cli(db, "doctor")
    assert "[warn]" in doctor.stdout  # the test server keeps unlimited WAL for slots
    done = cli(db, "catch-up")
    assert done.returncode == 0, done.output
    assert "max_slot_wal_keep_size" in done.stderr  # logged, not fatal


def test_the_role_the_fixture_makes_is_enough(db: TestDatabase, role: Role) -> None:
    done = cli(db, "catch-up", dsn=role.dsn)
    assert done.returncode == 0, done.output
    assert "[FAIL]" not in cli(db, "doctor", dsn=role.dsn).stdout


# -- the commands that only read or create the development schema ------------------------


def test_status_without_access_to_mana_ai(db: TestDatabase, role: Role) -> None:
    assert cli(db, "catch-up").returncode == 0  # as the superuser: it owns mana_ai
    done = cli(db, "status", dsn=role.dsn)
    assert_refused(
        done,
        f"read mana_ai: role {role.name} lacks USAGE on schema mana_ai",
        f"GRANT USAGE ON SCHEMA mana_ai TO {role.name};"
        f" GRANT SELECT ON ALL TABLES IN SCHEMA mana_ai TO {role.name};",
    )


def test_doctor_with_a_setup_problem_lists_it(db: TestDatabase, role: Role) -> None:
    execute(db, f"REVOKE CREATE ON DATABASE {db.name} FROM {role.name}")
    done = cli(db, "doctor", dsn=role.dsn)
    assert done.returncode == 1
    assert "[FAIL] schema mana_ai" in done.stdout
    assert "Traceback" not in done.output


@pytest.mark.parametrize("command", ["dev-schema", "demo --allow-database-url --duration 10"])
def test_dev_schema_without_create_on_public(db: TestDatabase, role: Role, command: str) -> None:
    done = cli(db, command, dsn=role.dsn)
    assert_refused(
        done,
        f"dev schema: role {role.name} may not create tables in schema public",
        "run it as the owner of the database (development databases only)",
    )


def test_a_refusal_no_check_foresees_exits_2(pg_db: TestDatabase) -> None:
    # dev-schema may create the table (CREATE on public), but an event trigger refuses the
    # role's DDL with insufficient_privilege: the command line maps it by its SQLSTATE.
    name = f"{pg_db.name}_dev"
    execute(
        pg_db,
        f"CREATE ROLE {name} LOGIN",
        f"GRANT CREATE ON SCHEMA public TO {name}",
        "CREATE FUNCTION refuse_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF current_user = '{name}' THEN"
        " RAISE insufficient_privilege USING MESSAGE = 'no DDL here'; END IF; END $$",
        "CREATE EVENT TRIGGER refuse_ddl ON ddl_command_start EXECUTE FUNCTION refuse_ddl()",
    )
    try:
        done = cli(pg_db, "dev-schema", dsn=conninfo.make_conninfo(pg_db.dsn, user=name))
        assert done.returncode == 2, done.output
        assert "no DDL here (SQLSTATE 42501)" in done.stderr
        assert "fix: `mission-runner doctor`" in done.stderr
        assert "Traceback" not in done.output
    finally:
        execute(
            pg_db, "DROP EVENT TRIGGER refuse_ddl", f"DROP OWNED BY {name}", f"DROP ROLE {name}"
        )


# -- an unreachable database -------------------------------------------------------------

ALL_COMMANDS = [
    "run",
    "catch-up",
    "status",
    "rebuild",
    "replay --from-lsn 0/0",
    "doctor",
    "dev-schema",
    "demo --allow-database-url --duration 5",
]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_an_unreachable_database(db: TestDatabase, command: str) -> None:
    done = cli(db, command, dsn=UNREACHABLE)
    assert done.returncode == 2, done.output
    assert "DATABASE_URL" in done.stderr and "cannot connect" in done.stderr
    assert "Traceback" not in done.output
