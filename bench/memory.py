"""Resident memory of the service with 100k missions and 10k agents loaded.

Target: at most 2 KiB per mission on top of the record's JSON size. The service (`mission-runner
run`, a separate process) boots from persisted snapshots of N missions and M agents; its
resident set (VmRSS) is read once it dispatches, and compared with the same service on an
empty database. Per mission: (loaded - empty) / N, everything the agents cost included.

    .venv/bin/python bench/memory.py [--missions 100000] [--agents 10000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import bench_server, create_schema  # noqa: E402


def seed(dsn: str, missions: int, agents: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
            " field_meta, client_id) SELECT 'ai', 'agents', 'a' || u, 'u' || u, 'insert',"
            " jsonb_build_object('id', 'a' || u, 'name', 'Agent ' || u, 'role',"
            " 'A careful planner for the household and the garden', 'state', 'active',"
            " 'maxConcurrentMissions', 1, 'maxTokensPerDay', 50000, 'policy',"
            " jsonb_build_object('tools', '{}'::jsonb, 'defaultsByModule', '{}'::jsonb,"
            " 'defaultForAi', 'propose')), '{}', 'bench' FROM generate_series(0, %s - 1) u",
            (agents,),
        )
        for start in range(0, missions, 20_000):
            end = min(missions, start + 20_000) - 1
            conn.execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                " field_meta, client_id) SELECT 'ai', 'aiMissions', 'm' || i, 'u' || (i %% %s),"
                " 'insert', jsonb_build_object('id', 'm' || i, 'title', 'Mission number ' || i,"
                " 'conceptMarkdown', 'Look at what changed since last time and propose steps.',"
                " 'objective', 'Keep the garden project on track', 'inputs', jsonb_build_array("
                " jsonb_build_object('module', 'notes', 'table', 'notes', 'id', 'n' || i)),"
                " 'cadence', jsonb_build_object('kind', 'daily', 'atHour', 8, 'atMinute', 0),"
                " 'state', 'active', 'nextRunAt', '2099-01-01T08:00:00.000Z', 'iterations',"
                " '[]'::jsonb, 'agentId', 'a' || (i %% %s)), '{}', 'bench'"
                " FROM generate_series(%s::int, %s::int) i",
                (agents, agents, start, end),
            )
            conn.execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                " field_meta, client_id) SELECT 'ai', 'aiMissions', 'm' || i, 'u' || (i %% %s),"
                " 'update', jsonb_build_object('title', 'Renamed mission ' || i, 'nextRunAt',"
                " '2099-01-02T08:00:00.000Z'), jsonb_build_object('title',"
                " jsonb_build_object('at', '2026-11-22T10:00:00.000Z', 'origin', 'user'),"
                " 'nextRunAt', jsonb_build_object('at', '2026-11-22T10:00:00.000Z',"
                " 'origin', 'user')), 'bench' FROM generate_series(%s::int, %s::int) i",
                (agents, start, end),
            )


def rss_of_service(dsn: str, slot: str) -> int:
    """Start `mission-runner run`, wait until it dispatches, return its VmRSS in bytes."""
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "MISSION_RUNNER_SLOT": slot,
        "HTTP_PORT": "0",
        "LOG_LEVEL": "info",
    }
    cli = [sys.executable, "-m", "mission_runner.cli"]
    subprocess.run([*cli, "catch-up"], env=env, check=True, cwd=ROOT, capture_output=True)
    proc = subprocess.Popen(
        [*cli, "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "dispatching due missions" in line:
                break
        time.sleep(2.0)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kib = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
        return kib * 1024
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--missions", type=int, default=100_000)
    ap.add_argument("--agents", type=int, default=10_000)
    args = ap.parse_args()
    with bench_server() as server:
        empty_dsn = conninfo.make_conninfo(server.dsn, dbname="empty")
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE empty")
        create_schema(server.dsn)
        create_schema(empty_dsn)
        seed(server.dsn, args.missions, args.agents)
        empty = rss_of_service(empty_dsn, "empty_slot")
        loaded = rss_of_service(server.dsn, "loaded_slot")
        with psycopg.connect(server.dsn) as conn:
            row = conn.execute(
                "SELECT count(*), avg(octet_length(record::text)) FROM mana_ai.mission_snapshots"
            ).fetchone()
            assert row is not None
            count, json_size = int(row[0]), float(row[1])
        per_mission = (loaded - empty) / args.missions
        print(f"PostgreSQL {server.version}; {count} missions, {args.agents} agents")
        print(f"  resident set: {loaded / 2**20:.1f} MiB loaded, {empty / 2**20:.1f} MiB empty")
        print(
            f"  per mission (agents included): {per_mission:.0f} B; record JSON "
            f"{json_size:.0f} B; on top of the JSON: {per_mission - json_size:.0f} B"
            f" (target <= 2048 B)"
        )


if __name__ == "__main__":
    main()
