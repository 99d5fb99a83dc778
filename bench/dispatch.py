"""Dispatch delay: from a mission's `nextRunAt` to its planner request (target p99 <= 250 ms).

N missions (default 10k, over 1000 users with one agent each) fall due within one minute; an
OpenAI-compatible planner in a separate process answers every call after 50 ms and records
when each request arrived. The service runs in this process with the LLM planner pointed at
it. The delay of a mission is (arrival of its first planner request) - nextRunAt.

    .venv/bin/python bench/dispatch.py [--missions 10000] [--window 60] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import statistics
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import bench_server, create_schema  # noqa: E402
from core.instants import parse_stamp  # noqa: E402
from mission_runner.app import open_app  # noqa: E402
from mission_runner.cli import serve  # noqa: E402
from mission_runner.settings import Settings  # noqa: E402

TITLE = re.compile(rb"bench mission (m\d+)")


def planner_process(port_out: object, results: object, latency: float) -> None:
    """A minimal OpenAI-compatible server: sleep `latency`, answer with a short plan."""
    from aiohttp import web

    arrivals: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        match = TITLE.search(body)
        if match is not None:
            arrivals.setdefault(match.group(1).decode(), time.time_ns() // 1000)
        await asyncio.sleep(latency)
        answer = {
            "id": "cmpl",
            "object": "chat.completion",
            "model": "bench",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "A short plan."},
                }
            ],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60},
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def report(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(arrivals), content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        app.router.add_get("/arrivals", report)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_out.send(runner.addresses[0][1])  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    asyncio.run(main())


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seed(dsn: str, missions: int, users: int, first_due: datetime, window: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
            " field_meta, client_id) SELECT 'ai', 'agents', 'a' || u, 'u' || u, 'insert',"
            " jsonb_build_object('id', 'a' || u, 'name', 'Agent ' || u, 'state', 'active',"
            " 'maxConcurrentMissions', 1, 'role', 'Plans.'), '{}', 'bench'"
            " FROM generate_series(0, %s - 1) u",
            (users,),
        )
        step_ms = window * 1000 / missions
        conn.execute(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
            " field_meta, client_id) SELECT 'ai', 'aiMissions', 'm' || i, 'u' || (i %% %s),"
            " 'insert', jsonb_build_object('id', 'm' || i, 'title', 'bench mission m' || i,"
            " 'objective', 'Keep things moving', 'state', 'active', 'agentId', 'a' || (i %% %s),"
            " 'iterations', '[]'::jsonb, 'cadence', jsonb_build_object('kind', 'manual'),"
            " 'nextRunAt', to_char((%s::timestamptz + i * %s * interval '1 ms') AT TIME ZONE 'UTC',"
            " 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')), '{}', 'bench'"
            " FROM generate_series(0, %s - 1) i",
            (users, users, first_due, step_ms, missions),
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(dsn: str, planner_url: str, args: argparse.Namespace) -> None:
    settings = replace(
        Settings.from_env({}),
        database_url=dsn,
        planner_url=planner_url,
        planner_api_key="bench",
        http_port=0,
    )
    async with open_app(settings, dsn=dsn) as app:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(app, stop))
        deadline = time.monotonic() + args.lead + args.window + 120
        while app.metrics.runtime.plans_written_back._value.get() < args.missions:
            if time.monotonic() > deadline or task.done():
                break
            await asyncio.sleep(0.5)
        stop.set()
        await task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--missions", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--window", type=float, default=60.0, help="seconds they fall due in")
    ap.add_argument("--lead", type=float, default=15.0, help="seconds before the first is due")
    ap.add_argument("--latency", type=float, default=0.05, help="planner answer time, s")
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    port_in, port_out = ctx.Pipe()
    planner = ctx.Process(target=planner_process, args=(port_out, None, args.latency), daemon=True)
    planner.start()
    port = port_in.recv()
    url = f"http://127.0.0.1:{port}"
    try:
        with bench_server() as server:
            create_schema(server.dsn)
            first_due = datetime.now(UTC) + timedelta(seconds=args.lead)
            seed(server.dsn, args.missions, args.users, first_due, args.window)
            print(
                f"PostgreSQL {server.version}; {args.missions} missions over {args.users}"
                f" agents due within {args.window:g} s; planner answers in"
                f" {args.latency * 1000:g} ms"
            )
            asyncio.run(run(server.dsn, url, args))
            with psycopg.connect(server.dsn) as conn:
                due = {
                    str(rid): parse_stamp(str(nra))
                    for rid, nra in conn.execute(
                        "SELECT record_id, data->>'nextRunAt' FROM sync_changes"
                        " WHERE table_name = 'aiMissions' AND op = 'insert'"
                    )
                }
                written = conn.execute(
                    "SELECT count(*) FROM sync_changes WHERE client_id = 'mana-ai-runner'"
                ).fetchone()
        import urllib.request

        with urllib.request.urlopen(f"{url}/arrivals") as res:
            arrivals: dict[str, int] = orjson.loads(res.read())
    finally:
        planner.terminate()
    delays = [(arrivals[m] - at) / 1000 for m, at in due.items() if m in arrivals and at]
    print(
        f"  iterations written: {written[0] if written else 0} of {args.missions};"
        f" planner requests from {len(arrivals)} missions"
    )
    print(
        f"  dispatch delay nextRunAt -> planner request: p50 {statistics.median(delays):.1f} ms"
        f"  p99 {percentile(delays, 0.99):.1f} ms  max {max(delays):.1f} ms"
        f"  (min {min(delays):.1f} ms)"
    )


if __name__ == "__main__":
    main()
