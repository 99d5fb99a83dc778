"""The mission runtime against a real server and a real local OpenAI-compatible server:
due missions, gates, the planner loop, and exactly-once write-back through crashes."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from core.instants import parse_stamp
from core.sync_changes import CLIENT_ID
from mission_runner.metrics import Metrics
from mission_runner.settings import Settings
from planner.gates import LEGACY_AGENT_ID
from tests.fix_data import (
    PAST_US,
    Change,
    agent,
    agent_update,
    awrite,
    iteration_rows,
    ledger_rows,
    mission,
    stamp,
    write,
)
from tests.fix_llm import Call, FakeLLM, ProviderFail, Reply, ServerError, Slow
from tests.fix_pg import TestDatabase
from tests.fix_service import (
    ServiceProcess,
    eventually,
    running_full_service,
    settings_for,
    wait_until,
)
from writer.iterations import iteration_id_for

pytestmark = pytest.mark.integration

JS_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def llm_settings(db: TestDatabase, fake: FakeLLM, **kw: Any) -> Settings:
    return settings_for(
        db, planner_url=fake.url, planner_api_key="sk-test-secret", planner_retry_base=0.01, **kw
    )


async def test_a_due_mission_gets_exactly_one_iteration(
    db: TestDatabase, fake_llm: FakeLLM
) -> None:
    fake_llm.script(
        Reply(tool_calls=[Call("create_task", {"title": "Water the plants"})]),
        Reply(
            "Water the plants tomorrow.",
            usage={"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        ),
    )
    write(
        db,
        agent(
            "a1",
            systemPrompt="enc:1:AAAAAAAAAAAAAAAA.BBBBBBBB",
            memory="enc:1:CC.DD",
            policy={"tools": {"create_note": "deny"}, "defaultsByModule": {}},
        ),
    )
    metrics = Metrics()
    async with running_full_service(db, llm_settings(db, fake_llm), metrics=metrics) as svc:
        await awrite(db, mission("m1"))
        await eventually(lambda: len(iteration_rows(db)) == 1, what="the iteration row")
        # Our own row comes back through the stream into the snapshot.
        await eventually(
            lambda: bool((s := svc.ingest.missions.get("u1", "m1")) and s.values["iterations"]),
            what="the echo of the iteration",
        )
        await svc.supervisor.sync_point()
        assert svc.runtime.in_flight == 0
    rows = iteration_rows(db)
    assert len(rows) == 1
    row = rows[0]
    iteration_id = iteration_id_for("u1", "m1", PAST_US)
    assert (row["app_id"], row["table_name"], row["record_id"], row["user_id"], row["op"]) == (
        "ai",
        "aiMissions",
        "m1",
        "u1",
        "update",
    )
    assert (row["client_id"], row["origin"], row["schema_version"]) == (CLIENT_ID, "agent", 1)
    assert set(row["field_meta"]) == {"iterations"}
    assert parse_stamp(row["field_meta"]["iterations"]) is not None
    assert row["actor"] == {
        "kind": "ai",
        "principalId": "a1",
        "displayName": "Agent a1",
        "missionId": "m1",
        "iterationId": iteration_id,
        "rationale": "Get the garden ready",
    }
    (iteration,) = row["data"]["iterations"]
    assert iteration["id"] == iteration_id
    # Every timestamp we write is in the web app's toISOString() form.
    stamps = (row["field_meta"]["iterations"], iteration["startedAt"], iteration["finishedAt"])
    assert all(JS_ISO.fullmatch(t) for t in stamps), stamps
    assert iteration["source"] == "server"
    assert iteration["overallStatus"] == "awaiting-review"
    assert iteration["summary"] == "Water the plants tomorrow."
    (step,) = iteration["plan"]
    assert step["id"] == f"{iteration_id}-0"
    assert step["status"] == "planned"
    assert step["intent"] == {
        "kind": "toolCall",
        "toolName": "create_task",
        "params": {"title": "Water the plants"},
    }
    assert ledger_rows(db) == {"m1": ("written", 1)}
    # The planner request: Bearer key, model, only offered tools, no ciphertext.
    first = fake_llm.requests[0]
    assert {k.lower(): v for k, v in first.headers.items()}["authorization"] == (
        "Bearer sk-test-secret"
    )
    assert first.json["model"] == "mana/reasoning"
    offered = {t["function"]["name"] for t in first.json["tools"]}
    assert "create_task" in offered
    assert "create_note" not in offered  # denied by the agent
    assert "delete_task" not in offered  # denied by the catalog
    assert "enc:" not in first.body.decode()
    assert "Plans carefully." in first.body.decode()
    assert sample(metrics, "mana_ai_agent_decisions_total", decision="ran") == 1
    assert sample(metrics, "mana_ai_plans_written_back_total") == 1
    # Usage is summed over the rounds: 15 (tool-call round) + 120 (final answer).
    assert sample(metrics, "mana_ai_tokens_used_total", agent_id="a1") == 135
    with psycopg.connect(db.dsn) as conn:
        usage = conn.execute("SELECT agent_id, mission_id, tokens FROM mana_ai.token_usage")
        assert usage.fetchall() == [("a1", "m1", 135)]


async def test_missing_agent_runs_as_the_legacy_default_agent(
    db: TestDatabase, fake_llm: FakeLLM
) -> None:
    metrics = Metrics()
    async with running_full_service(db, llm_settings(db, fake_llm), metrics=metrics):
        await awrite(db, mission("m1", agent_id="gone"), mission("m2", agent_id=None))
        await eventually(lambda: len(iteration_rows(db)) == 2, what="two iterations")
    for row in iteration_rows(db):
        assert row["actor"]["principalId"] == LEGACY_AGENT_ID
        assert row["actor"]["displayName"] == "Mana"
        assert row["data"]["iterations"][0]["overallStatus"] == "approved"  # no steps
    assert (
        sum(
            sample(metrics, "mana_ai_agent_decisions_total", decision=d)
            for d in (
                "ran",
                "skipped-paused",
                "skipped-archived",
                "skipped-concurrency",
                "skipped-budget",
            )
        )
        == 0
    )


async def test_gates_skip_and_count(db: TestDatabase, fake_llm: FakeLLM) -> None:
    write(
        db,
        agent("archived", state="archived"),
        agent("paused", state="paused"),
        agent("broke", maxTokensPerDay=0),
    )
    metrics = Metrics()
    async with running_full_service(db, llm_settings(db, fake_llm), metrics=metrics) as svc:
        await awrite(
            db,
            mission("m1", agent_id="archived"),
            mission("m2", agent_id="paused"),
            mission("m3", agent_id="broke"),
        )
        await eventually(
            lambda: (
                sample(metrics, "mana_ai_agent_decisions_total", decision="skipped-budget") == 1
            ),
            what="three decisions",
        )
        assert sample(metrics, "mana_ai_agent_decisions_total", decision="skipped-archived") == 1
        assert sample(metrics, "mana_ai_agent_decisions_total", decision="skipped-paused") == 1
        assert iteration_rows(db) == []
        # Resuming the paused agent is an event: its due mission runs, without polling.
        await awrite(db, agent_update("paused", state="active"))
        await eventually(lambda: len(iteration_rows(db, "m2")) == 1, what="the resumed mission")
        await svc.supervisor.sync_point()
    assert fake_llm.requests and len(fake_llm.requests) == 1
    assert iteration_rows(db, "m1") == [] and iteration_rows(db, "m3") == []


async def test_concurrency_defers_and_releases(db: TestDatabase, fake_llm: FakeLLM) -> None:
    fake_llm.default = Slow(0.4, Reply("done"))
    write(db, agent("a1", maxConcurrentMissions=1))
    metrics = Metrics()
    async with running_full_service(db, llm_settings(db, fake_llm), metrics=metrics) as svc:
        await awrite(db, mission("m1"), mission("m2"), mission("m3"))
        await eventually(lambda: len(iteration_rows(db)) == 3, within=30, what="3 iterations")
        await svc.supervisor.sync_point()
    assert sample(metrics, "mana_ai_agent_decisions_total", decision="ran") == 3
    assert sample(metrics, "mana_ai_agent_decisions_total", decision="skipped-concurrency") == 2
    # Never more than one plan in flight for the agent: the requests did not overlap.
    assert len(fake_llm.requests) == 3


async def test_budget_counts_tokens_of_the_last_24_hours(
    db: TestDatabase, fake_llm: FakeLLM
) -> None:
    fake_llm.default = Reply(
        "ok", usage={"prompt_tokens": 60, "completion_tokens": 40, "total_tokens": 100}
    )
    write(db, agent("a1", maxTokensPerDay=150, maxConcurrentMissions=5))
    with db.connect() as conn:
        conn.execute(
            "CREATE SCHEMA IF NOT EXISTS mana_ai; CREATE TABLE IF NOT EXISTS mana_ai.token_usage"
            " (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id text NOT NULL,"
            " agent_id text NOT NULL, mission_id text NOT NULL, tokens int NOT NULL"
            " CHECK (tokens > 0), ts timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO mana_ai.token_usage (user_id, agent_id, mission_id, tokens, ts)"
            " VALUES ('u1', 'a1', 'old', 1000, now() - interval '25 hours'),"
            " ('u1', 'a1', 'old', 100, now() - interval '1 hour')"
        )
    metrics = Metrics()
    async with running_full_service(db, llm_settings(db, fake_llm), metrics=metrics) as svc:
        await awrite(db, mission("m1"))
        await eventually(lambda: len(iteration_rows(db)) == 1, what="the first plan")
        await svc.supervisor.sync_point()
        await awrite(db, mission("m2"))
        await eventually(
            lambda: (
                sample(metrics, "mana_ai_agent_decisions_total", decision="skipped-budget") == 1
            ),
            what="the budget skip",
        )
    # 100 (an hour ago) + 100 (m1) >= 150: m2 waits; the 25-hour-old 1000 did not count.
    assert [r["record_id"] for r in iteration_rows(db)] == ["m1"]


async def test_moving_next_run_at_makes_a_new_occurrence(
    db: TestDatabase, fake_llm: FakeLLM
) -> None:
    write(db, agent("a1"))
    async with running_full_service(db, llm_settings(db, fake_llm)) as svc:
        await awrite(db, mission("m1"))
        await eventually(lambda: len(iteration_rows(db)) == 1, what="the first occurrence")
        await svc.supervisor.sync_point()
        later = "2026-04-16T00:00:00.000Z"
        await awrite(
            db,
            Change(
                "u1",
                "aiMissions",
                "m1",
                "update",
                {"nextRunAt": later},
                {"nextRunAt": stamp("2099-01-01T00:00:00.000Z")},
            ),
        )
        await eventually(lambda: len(iteration_rows(db)) == 2, what="the second occurrence")
        await svc.supervisor.sync_point()
        # The same value again (a re-sent update, or another field changing) is not new.
        await awrite(
            db,
            Change(
                "u1",
                "aiMissions",
                "m1",
                "update",
                {"nextRunAt": "2026-04-16T00:00:00Z", "title": "again"},
                {
                    "nextRunAt": stamp("2099-01-02T00:00:00.000Z"),
                    "title": stamp("2099-01-02T00:00:00.000Z"),
                },
            ),
        )
        await svc.supervisor.sync_point()
        await svc.supervisor.sync_point()
    rows = iteration_rows(db)
    assert len(rows) == 2
    # The second write-back carries the first iteration too (values are replaced whole).
    assert len(rows[1]["data"]["iterations"]) == 2
    assert len(fake_llm.requests) == 2


async def test_planner_failures_end_as_a_failed_iteration(
    db: TestDatabase, fake_llm: FakeLLM
) -> None:
    fake_llm.script(ServerError(503), ServerError(502), ServerError(500))
    write(db, agent("a1"))
    metrics = Metrics()
    async with running_full_service(
        db, llm_settings(db, fake_llm, planner_max_attempts=3), metrics=metrics
    ):
        await awrite(db, mission("m1"))
        await eventually(lambda: len(iteration_rows(db)) == 1, what="the failed iteration")
    (row,) = iteration_rows(db)
    (iteration,) = row["data"]["iterations"]
    assert iteration["overallStatus"] == "failed"
    assert iteration["errorDetails"]["kind"] == "http-500"
    assert iteration["errorDetails"]["attempts"] == 3
    assert iteration["plan"] == []
    assert ledger_rows(db) == {"m1": ("failed", 3)}
    assert len(fake_llm.requests) == 3
    assert sample(metrics, "mana_ai_mission_errors_total") == 1
    assert (
        sum(
            sample(metrics, "mana_ai_provider_errors_total", provider="127.0.0.1", kind=k)
            for k in ("http-503", "http-502", "http-500")
        )
        == 3
    )


async def test_a_non_retryable_provider_error_fails_at_once(
    db: TestDatabase, fake_llm: FakeLLM
) -> None:
    fake_llm.script(ProviderFail(400, "context-length", "prompt too long"))
    write(db, agent("a1"))
    async with running_full_service(db, llm_settings(db, fake_llm)):
        await awrite(db, mission("m1"))
        await eventually(lambda: len(iteration_rows(db)) == 1, what="the failed iteration")
    (row,) = iteration_rows(db)
    details = row["data"]["iterations"][0]["errorDetails"]
    assert details["kind"] == "context-length"
    assert details["attempts"] == 1
    assert "prompt too long" in details["message"]
    assert len(fake_llm.requests) == 1


def _scans(db: TestDatabase) -> tuple[int, int, int]:
    with psycopg.connect(db.dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0), n_tup_ins"
            " FROM pg_stat_user_tables WHERE relname = 'sync_changes'"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def test_no_query_on_sync_changes_finds_due_missions(
    db: TestDatabase, fake_llm: FakeLLM
) -> None:
    write(db, agent("a1", maxConcurrentMissions=10))
    soon = [mission(f"m{i}", next_run_at=f"2026-04-15T00:00:0{i}.000Z") for i in range(5)]
    async with running_full_service(db, llm_settings(db, fake_llm)) as svc:
        await svc.supervisor.sync_point()
        wait_until(lambda: _scans(db)[2] == 1, what="stats of the start-up")
        seq0, idx0, ins0 = _scans(db)
        await awrite(db, *soon)
        # (Waiting on our ledger, not on sync_changes: this test must not scan it either.)
        await eventually(
            lambda: sum(s == "written" for s, _a in ledger_rows(db).values()) == 5,
            what="five iterations",
        )
        await svc.supervisor.sync_point()
        # Statistics arrive when each backend flushes them: wait until our 5 + 5 inserts show.
        await eventually(lambda: _scans(db)[2] == ins0 + 10, within=30, what="insert stats")
        seq1, idx1, _ = _scans(db)
    assert (seq1, idx1) == (seq0, idx0)


def _persisted_iterations(db: TestDatabase, mission_id: str) -> int:
    with psycopg.connect(db.dsn) as conn:
        row = conn.execute(
            "SELECT jsonb_array_length(record->'iterations') FROM mana_ai.mission_snapshots"
            " WHERE mission_id = %s",
            (mission_id,),
        ).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


@pytest.mark.parametrize("failpoint", ["after-planner", "after-write-back"])
def test_sigkill_at_each_step_still_writes_exactly_one_iteration(
    db: TestDatabase, service_processes: list[ServiceProcess], failpoint: str
) -> None:
    write(db, agent("a1"), mission("m1"))
    first = ServiceProcess(db, HTTP_PORT="0", MISSION_RUNNER_FAILPOINTS=f"{failpoint}=1")
    service_processes.append(first.start())
    assert first.wait(60) == -9, first.output()
    again = ServiceProcess(db, HTTP_PORT="0")
    service_processes.append(again.start())
    again.wait_streaming()
    wait_until(
        lambda: ledger_rows(db).get("m1", ("", 0))[0] == "written", 60, "the occurrence to be final"
    )
    # The restarted service has seen its own row come back (persisted in the snapshot).
    wait_until(lambda: _persisted_iterations(db, "m1") == 1, 60, "the echo in the snapshot")
    assert again.terminate() == 0, again.output()
    rows = iteration_rows(db)
    assert len(rows) == 1, rows
    assert rows[0]["data"]["iterations"][0]["id"] == iteration_id_for("u1", "m1", PAST_US)
