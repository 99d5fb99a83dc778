"""Operating the service: one active instance, take-over, SIGTERM, HTTP, metrics, logs."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from mission_runner.metrics import Metrics
from tests.fix_data import (
    agent,
    awrite,
    iteration_rows,
    ledger_rows,
    mission,
    mission_insert,
    persisted,
    recompute,
    slot_row,
    write,
)
from tests.fix_llm import FakeLLM, Reply, Slow
from tests.fix_pg import TestDatabase
from tests.fix_service import (
    ServiceProcess,
    eventually,
    running_full_service,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_a_second_instance_waits_and_takes_over(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    port_a, port_b = free_port(), free_port()
    a = ServiceProcess(db, HTTP_PORT=str(port_a)).start()
    service_processes.append(a)
    wait_until(lambda: get(port_a, "/readyz")[0] == 200, what="A ready")
    b = ServiceProcess(db, HTTP_PORT=str(port_b)).start()
    service_processes.append(b)
    wait_until(lambda: get(port_b, "/healthz")[0] == 200, what="B alive")
    time.sleep(1.0)
    status, body = get(port_b, "/readyz")
    assert status == 503, body
    assert get(port_a, "/readyz")[0] == 200
    assert "another instance is active" in b.output()
    assert "Traceback" not in b.output()
    # A dies without a goodbye: B takes over within seconds.
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait(10)
    started = time.monotonic()
    wait_until(lambda: get(port_b, "/readyz")[0] == 200, 20, "B to take over")
    assert time.monotonic() - started < 10
    write(db, mission_insert("u", "after-takeover"))
    wait_until(lambda: ("u", "after-takeover") in persisted(db)["mission"], 20, "B applies")
    assert b.terminate() == 0, b.output()
    assert persisted(db) == recompute(db)


async def test_sigterm_with_a_plan_in_flight_exits_cleanly_and_plans_again(
    db: TestDatabase, fake_llm: FakeLLM, service_processes: list[ServiceProcess]
) -> None:
    fake_llm.default = Slow(60, Reply("too late"))
    write(db, agent("a1"))
    env = {"PLANNER_URL": fake_llm.url, "HTTP_PORT": "0"}
    first = ServiceProcess(db, **env).start()
    service_processes.append(first)
    await asyncio.to_thread(first.wait_streaming)
    await awrite(db, mission("m1"))
    await eventually(lambda: len(fake_llm.requests) == 1, within=30, what="the planner call")
    assert first.proc is not None
    started = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(first.proc.wait, 15)
    assert code == 0, first.output()
    assert time.monotonic() - started < 10
    assert not (slot_row(db) or {}).get("active")
    # Nothing half-written: the occurrence is not final and no iteration was appended.
    assert ledger_rows(db) == {"m1": ("planning", 1)}
    assert iteration_rows(db) == []
    fake_llm.default = Reply("planned after the restart")
    again = ServiceProcess(db, **env).start()
    service_processes.append(again)
    await eventually(
        lambda: ledger_rows(db).get("m1", ("", 0))[0] == "written",
        within=30,
        what="the occurrence planned after the restart",
    )
    assert again.terminate() == 0
    assert len(iteration_rows(db)) == 1


async def test_http_endpoints_and_metrics(db: TestDatabase) -> None:
    metrics = Metrics()
    settings = settings_for(db)
    async with running_full_service(db, settings, metrics=metrics) as svc:
        runner_port = svc.app.status.port
        assert runner_port is not None
        await awrite(db, mission_insert("u", "m1"))
        await svc.supervisor.sync_point()
        await svc.app.monitor.sample()
        health = await asyncio.to_thread(get, runner_port, "/healthz")
        ready = await asyncio.to_thread(get, runner_port, "/readyz")
        text = (await asyncio.to_thread(get, runner_port, "/metrics"))[1].decode()
        status = json.loads((await asyncio.to_thread(get, runner_port, "/api/status"))[1])
        page = await asyncio.to_thread(get, runner_port, "/")
    assert health[0] == 200
    assert ready[0] == 200, ready
    for name in (
        "mana_ai_replication_lag_bytes",
        "mana_ai_replication_retained_wal_bytes",
        "mana_ai_replication_safe_wal_bytes",
        "mana_ai_replication_lag_seconds",
        'mana_ai_replication_wal_status{status="reserved"} 1.0',
        "mana_ai_stream_transactions_total",
        "mana_ai_stream_rows_total",
        "mana_ai_checkpoint_lsn",
        "mana_ai_commit_to_apply_seconds_bucket",
        'mana_ai_snapshots{kind="mission"} 1.0',
        "mana_ai_http_requests_total",
    ):
        assert name in text, name
    assert status["instance"]["ready"] is True
    assert status["slot"]["wal_status"] == "reserved"
    assert status["snapshots"]["missions"] == 1
    assert "due_queue" in status and "recent_dispatches" in status
    assert page[0] == 200 and b"<title>mission-runner</title>" in page[1]
    assert metrics.registry.get_sample_value("mana_ai_replication_lag_bytes") is not None


def test_json_logs_carry_context_and_no_secrets(
    db: TestDatabase, service_processes: list[ServiceProcess]
) -> None:
    with psycopg.connect(db.dsn) as conn:
        conn.execute("ALTER TABLE sync_changes DROP CONSTRAINT sync_changes_op_check")
    svc = ServiceProcess(
        db, LOG_FORMAT="json", HTTP_PORT="0", PLANNER_API_KEY="sk-never-in-logs"
    ).start()
    service_processes.append(svc)
    svc.wait_streaming()
    from tests.fix_data import Change

    write(db, Change("u", "aiMissions", "bad", "upsert", {"a": 1}, {}))
    wait_until(lambda: "dead letter at" in svc.output(), what="the dead-letter log line")
    assert svc.terminate() == 0
    lines = [json.loads(line) for line in svc.output().splitlines() if line.startswith("{")]
    assert lines, svc.output()
    dead = [entry for entry in lines if entry["msg"].startswith("dead letter at")]
    assert dead and dead[0]["lsn"] and dead[0]["level"] == "warning"
    assert "sk-never-in-logs" not in svc.output()
