"""The checks of server and role, on facts made up here (no server)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from core.errors import SetupError
from core.lsn import Lsn
from mission_runner import checks
from mission_runner.checks import (
    FAIL,
    OK,
    WARN,
    Facts,
    OurSchema,
    OurTable,
    Role,
    SourceTable,
)
from mission_runner.doctor import format_checks
from stream.slots import PublicationInfo, SlotInfo

PUB_DDL = "CREATE PUBLICATION mission_runner FOR TABLE public.sync_changes"


def facts(**changes: object) -> Facts:
    """A setup the service works with, as a role that owns nothing but its schema."""
    good = Facts(
        server_version=170002,
        wal_level="logical",
        role=Role("svc", "app", replication=True, bypassrls=True),
        table=SourceTable(
            exists=True, select=True, insert=True, row_security=True, forced_row_security=True
        ),
        schema=OurSchema(exists=False, create_in_database=True),
        publication_name="mission_runner",
        publication=PublicationInfo(
            "mission_runner", True, False, False, False, True, "(app_id = 'ai'::text)"
        ),
        publication_ddl=PUB_DDL,
        slot_name="mission_runner",
        slot=None,
        max_slots=10,
        used_slots=2,
        max_senders=10,
        used_senders=2,
        wal_keep_size="10GB",
        sender_timeout_ms=60_000,
        status_interval=10.0,
        emit_function="pg_logical_emit_message(boolean,text,text)",
        emit_allowed=True,
    )
    return replace(good, **changes)  # type: ignore[arg-type]


def slot(**changes: object) -> SlotInfo:
    base = SlotInfo(
        name="mission_runner",
        plugin="pgoutput",
        database="app",
        temporary=False,
        active=False,
        active_pid=None,
        restart_lsn=Lsn(1),
        confirmed_flush_lsn=Lsn(2),
        wal_status="reserved",
        safe_wal_size=None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def service(f: Facts) -> list[checks.Check]:
    return checks.evaluate(f, checks.SERVICE)


def by_name(f: Facts, name: str) -> checks.Check:
    (found,) = [c for c in service(f) if c.name == name]
    return found


def test_a_good_setup_passes_every_check() -> None:
    results = service(facts())
    assert [c.result for c in results] == [OK] * len(results)
    assert checks.refusal(results) is None


def test_wal_level_other_than_logical_stops_the_start() -> None:
    check = checks.wal_level(facts(wal_level="replica"))
    assert (check.result, check.stops_start) == (FAIL, True)
    assert check.problem == "wal_level: replica"
    assert check.fix == "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
    refused = checks.refusal(service(facts(wal_level="replica")))
    assert isinstance(refused, SetupError)
    assert (refused.problem, refused.fix) == (check.problem, check.fix)
    assert checks.wal_level(facts()).result == OK


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"wal_keep_size": "-1"}, "max_slot_wal_keep_size"),
        ({"sender_timeout_ms": 0}, "wal_sender_timeout"),
        ({"server_version": 140010}, "server version"),
    ],
)
def test_warnings_do_not_stop_the_start(change: dict[str, object], name: str) -> None:
    f = facts(**change)
    assert by_name(f, name).result == WARN
    assert checks.refusal(service(f)) is None


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"slot": slot(wal_status="lost")}, "replication slot"),
        ({"used_slots": 10}, "replication slots free"),
        ({"used_senders": 10}, "WAL senders free"),
        ({"sender_timeout_ms": 15_000}, "wal_sender_timeout"),
    ],
)
def test_failures_the_service_rides_out_do_not_stop_it(
    change: dict[str, object], name: str
) -> None:
    f = facts(**change)
    check = by_name(f, name)
    assert (check.result, check.stops_start) == (FAIL, False)
    assert checks.refusal(service(f)) is None


@pytest.mark.parametrize(
    ("change", "name", "fix"),
    [
        ({"server_version": 130000}, "server version", "upgrade PostgreSQL to 15 or later"),
        (
            {"role": Role("svc", "app", bypassrls=True)},
            "REPLICATION privilege",
            "ALTER ROLE svc REPLICATION;",
        ),
        (
            {"role": Role("svc", "app", replication=True)},
            "read every user's rows",
            "ALTER ROLE svc BYPASSRLS;",
        ),
        (
            {"table": SourceTable(exists=True, select=True)},
            "sync_changes privileges",
            "GRANT SELECT, INSERT ON public.sync_changes TO svc;",
        ),
        (
            {
                "emit_allowed": False,
                "emit_function": "pg_logical_emit_message(boolean,text,text,boolean)",
            },
            "heartbeat",
            "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text,boolean) TO svc;",
        ),
        (
            {"schema": OurSchema(exists=False, create_in_database=False)},
            "schema mana_ai",
            "GRANT CREATE ON DATABASE app TO svc;",
        ),
        (
            {"publication": None},
            "publication",
            f"as the table owner run: {PUB_DDL}",
        ),
        (
            {"slot": slot(plugin="test_decoding")},
            "replication slot",
            "set MISSION_RUNNER_SLOT to an unused name, or drop that slot",
        ),
        (
            {"slot": slot(database="other")},
            "replication slot",
            "set MISSION_RUNNER_SLOT to an unused name, or drop that slot",
        ),
    ],
)
def test_each_setup_problem_stops_the_start_with_its_fix(
    change: dict[str, object], name: str, fix: str
) -> None:
    f = facts(**change)
    check = by_name(f, name)
    assert (check.result, check.stops_start, check.fix) == (FAIL, True, fix)
    refused = checks.refusal(service(f))
    assert refused is not None and refused.problem == check.problem and refused.fix == fix


def test_every_failure_that_stops_the_start_is_reported_in_order() -> None:
    f = facts(wal_level="replica", role=Role("svc", "app"), wal_keep_size="-1")
    refused = checks.refusal(service(f))
    assert refused is not None
    assert [c.name for c in refused.checks] == [
        "wal_level",
        "REPLICATION privilege",
        "read every user's rows",
    ]
    text = str(refused).splitlines()
    assert text[0] == "wal_level: replica"
    assert text[1] == "  fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
    assert "  fix: ALTER ROLE svc BYPASSRLS;" in text
    assert not any("max_slot_wal_keep_size" in line for line in text)


def test_doctor_prints_the_problem_line_start_up_prints() -> None:
    f = facts(role=Role("svc", "app", bypassrls=True))
    out = format_checks(service(f)).splitlines()
    i = out.index("[FAIL] REPLICATION privilege: role svc lacks it")
    assert out[i + 1] == "         fix: ALTER ROLE svc REPLICATION;"


def test_a_missing_table_is_one_failure() -> None:
    results = service(facts(table=SourceTable(exists=False), publication=None))
    failed = [c for c in results if c.result == FAIL]
    assert [c.name for c in failed] == ["sync_changes"]
    assert failed[0].fix is not None and "mission-runner dev-schema" in failed[0].fix


def test_the_table_owner_may_let_the_service_create_the_publication() -> None:
    owner = SourceTable(exists=True, select=True, insert=True, owner=True)
    assert by_name(facts(table=owner, publication=None), "publication").result == OK


@pytest.mark.parametrize(
    ("publication", "fix"),
    [
        (
            PublicationInfo("mission_runner", True, True, True, True, False, None),
            "ALTER PUBLICATION mission_runner SET (publish = 'insert'); ALTER PUBLICATION"
            " mission_runner ADD TABLE public.sync_changes WHERE (app_id = 'ai');",
        ),
        (
            PublicationInfo("mission_runner", True, False, True, False, True, "(app_id = 'ai')"),
            "ALTER PUBLICATION mission_runner SET (publish = 'insert');",
        ),
        (
            PublicationInfo("mission_runner", False, False, False, False, True, None),
            "ALTER PUBLICATION mission_runner SET (publish = 'insert');",
        ),
        (
            PublicationInfo("mission_runner", True, False, False, False, True, None, ("id",)),
            f"DROP PUBLICATION mission_runner; then let mission-runner create it, or run:"
            f" {PUB_DDL}",
        ),
    ],
)
def test_a_publication_that_would_not_work(publication: PublicationInfo, fix: str) -> None:
    check = by_name(facts(publication=publication), "publication")
    assert (check.result, check.stops_start, check.fix) == (FAIL, True, fix)


def test_no_row_filter_in_the_fix_before_15() -> None:
    pub = PublicationInfo("mission_runner", True, False, False, False, False, None)
    check = by_name(facts(server_version=140010, publication=pub), "publication")
    assert check.fix == "ALTER PUBLICATION mission_runner ADD TABLE public.sync_changes;"


def _table(name: str, *, owner: bool = True, read: bool = True, write: bool = True) -> OurTable:
    return OurTable(name, owner, read, write)


@pytest.mark.parametrize(
    ("schema", "result", "fix"),
    [
        (OurSchema(exists=False, create_in_database=True), OK, None),
        (
            OurSchema(exists=True, create_in_database=False, usage=False, create=True),
            FAIL,
            "GRANT USAGE ON SCHEMA mana_ai TO svc;",
        ),
        (
            OurSchema(exists=True, create_in_database=False, usage=True, create=False),
            FAIL,
            "GRANT CREATE ON SCHEMA mana_ai TO svc;",
        ),
        (  # migrated: no CREATE needed
            OurSchema(
                True,
                False,
                usage=True,
                create=False,
                tables=(_table("dead_letter"),),
                pending=False,
            ),
            OK,
            None,
        ),
        (
            OurSchema(True, False, True, True, (_table("token_usage", write=False),), False),
            FAIL,
            "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA mana_ai"
            " TO svc;",
        ),
        (
            OurSchema(True, False, True, True, (_table("stream_checkpoint", owner=False),), True),
            FAIL,
            "ALTER TABLE mana_ai.stream_checkpoint OWNER TO svc;",
        ),
        (  # tables of another role are fine once migrated
            OurSchema(True, False, True, True, (_table("stream_checkpoint", owner=False),), False),
            OK,
            None,
        ),
    ],
)
def test_schema_mana_ai(schema: OurSchema, result: str, fix: str | None) -> None:
    check = checks.schema(facts(schema=schema))
    assert (check.result, check.fix) == (result, fix)
    assert check.stops_start == (result == FAIL)


def test_status_needs_to_read_mana_ai_only_when_it_exists() -> None:
    assert checks.evaluate(facts(), checks.STATUS) == []
    no_usage = OurSchema(True, False, usage=False)
    (check,) = checks.evaluate(facts(schema=no_usage), checks.STATUS)
    assert (check.result, check.problem) == (
        FAIL,
        "read mana_ai: role svc lacks USAGE on schema mana_ai",
    )
    unreadable = OurSchema(True, False, True, True, (_table("dead_letter", read=False),))
    (check,) = checks.evaluate(facts(schema=unreadable), checks.STATUS)
    assert check.problem == "read mana_ai: role svc may not read mana_ai.dead_letter"


def test_dev_schema_needs_create_or_the_table() -> None:
    cannot = checks.dev_schema(facts())
    assert cannot.result == FAIL and "may not create tables in schema public" in cannot.detail
    owner = SourceTable(exists=True, schema_create=True, owner=True)
    assert checks.dev_schema(facts(table=owner)).result == OK
    foreign = SourceTable(exists=True, schema_create=True)
    assert "does not own it" in checks.dev_schema(facts(table=foreign)).detail
    superuser = Role("postgres", "app", superuser=True)
    assert checks.dev_schema(facts(role=superuser)).result == OK


def test_role_names_are_quoted_in_fixes_when_they_must_be() -> None:
    check = checks.replication_privilege(facts(role=Role("Svc-1", "app")))
    assert check.fix == 'ALTER ROLE "Svc-1" REPLICATION;'
    assert checks.ident('we"ird') == '"we""ird"'
    assert checks.ident("svc_1") == "svc_1"
