"""Commit-to-snapshot latency at a steady write rate (target: p99 <= 50 ms, in memory).

A separate process commits mission updates at a steady rate (default 2000 rows/s, in
transactions of 10 rows); the service runs in this process. For each applied transaction we
record now - its commit time (from the stream's Commit message), and for each row now - the
time the writer stamped into it just before sending it.

Then the longest event-loop stall: while a ticker task measures the gaps between its turns
of the loop, 100,000 new missions arrive in transactions of 10,000 rows (applied in steps)
and one group commit writes all 100,000 records (serialised in chunks); the same group
commit serialised in one step (what the service did before) is measured beside it.

    .venv/bin/python bench/latency.py [--rate 2000] [--seconds 20] [--rows-per-tx 10]
                                      [--stall-records 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench.common import bench_server, create_schema  # noqa: E402
from mission_runner.app import open_app  # noqa: E402
from mission_runner.cli import prepare_database  # noqa: E402
from mission_runner.runtime import tune_gc  # noqa: E402
from mission_runner.settings import Settings  # noqa: E402
from projections.group_commit import GroupCommitOptions  # noqa: E402


def writer(dsn: str, rate: int, seconds: float, rows_per_tx: int, ready: object) -> None:
    """Commit `rate` rows per second, `rows_per_tx` per transaction, on a fixed schedule."""
    interval = rows_per_tx / rate
    with psycopg.connect(dsn, autocommit=False) as conn:
        ready.set()  # type: ignore[attr-defined]
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + n * interval
            if due > now:
                time.sleep(due - now)
            sent = time.time_ns() // 1000
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data,"
                    " field_meta, client_id) VALUES ('ai', 'aiMissions', %s, %s, 'update',"
                    " jsonb_build_object('title', %s::text, 'sentAt', %s::bigint),"
                    " jsonb_build_object('title', %s::text, 'sentAt', %s::text), 'bench')",
                    [
                        (
                            f"m{(n * rows_per_tx + k) % 5000}",
                            f"u{k % 50}",
                            f"title {n}",
                            sent,
                            f"2026-11-22T00:00:00.{n % 1000:03d}Z",
                            "2026-11-22T00:00:00.000Z",
                        )
                        for k in range(rows_per_tx)
                    ],
                )
            conn.commit()
            n += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(dsn: str, args: argparse.Namespace) -> None:
    settings = replace(Settings.from_env({}), database_url=dsn)
    commit_lat: list[float] = []
    row_lat: list[float] = []
    async with open_app(settings, dsn=dsn) as app:
        ing = app.ingest
        await prepare_database(app)

        async def follow() -> None:
            # What the mission runtime sees: the change feed, taken in its own task.
            while True:
                changes = await app.feed.take()
                now = app.clock.now_us()
                if not changes.missions or ing.applied_commit_time_us is None:
                    continue
                commit_lat.append((now - ing.applied_commit_time_us) / 1000)
                for user, mission in changes.missions:
                    state = ing.missions.get(user, mission)
                    sent = state.values.get("sentAt") if state else None
                    if isinstance(sent, int):
                        row_lat.append((now - sent) / 1000)

        stop = asyncio.Event()
        task = asyncio.create_task(app.supervisor.run(stop))
        await app.supervisor.streaming.wait()
        tune_gc()
        follower = asyncio.create_task(follow())
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        proc = ctx.Process(
            target=writer, args=(dsn, args.rate, args.seconds, args.rows_per_tx, ready)
        )
        proc.start()
        await asyncio.to_thread(ready.wait)
        await asyncio.to_thread(proc.join)
        await app.supervisor.sync_point()
        follower.cancel()
        stop.set()
        await task
    await stalls(dsn, args.stall_records)
    # The first second is warm-up (connections, caches).
    skip = int(len(commit_lat) / args.seconds)
    c, r = commit_lat[skip:], row_lat[skip * args.rows_per_tx :]
    print(
        f"{len(row_lat)} rows in {len(commit_lat)} transactions at {args.rate} rows/s "
        f"({args.rows_per_tx} rows per transaction), first second dropped"
    )
    print(
        f"  commit -> in-memory snapshot:    p50 {statistics.median(c):6.2f} ms   "
        f"p99 {percentile(c, 0.99):6.2f} ms   max {max(c):6.2f} ms"
    )
    print(
        f"  writer send -> in-memory snapshot: p50 {statistics.median(r):6.2f} ms   "
        f"p99 {percentile(r, 0.99):6.2f} ms   max {max(r):6.2f} ms"
    )


class Ticker:
    """Measures the longest gap between its turns of the event loop (1 ms sleeps)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.001)
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.005)  # ticking before the measured work starts
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(0.005)  # a last turn after the measured work
        self._task.cancel()


async def stalls(dsn: str, records: int) -> None:
    """The longest loop stall while `records` new missions are applied and persisted, with
    chunked serialisation and with one step."""
    settings = replace(
        Settings.from_env({}), database_url=dsn, batch_max_delay=3600.0, batch_max_rows=10**9
    )
    results: list[str] = []
    default = GroupCommitOptions().serialize_chunk
    for label, chunk in (
        (f"chunked ({default:,} records per step)", default),
        ("one step", records),
    ):
        async with open_app(settings, dsn=dsn) as app:
            ing = app.ingest
            ing.options = replace(ing.options, serialize_chunk=chunk)
            await prepare_database(app)
            stop = asyncio.Event()
            task = asyncio.create_task(app.supervisor.run(stop))
            await app.supervisor.streaming.wait()
            await app.supervisor.sync_point()  # persist what is there: start clean
            base = len(ing.missions)
            async with Ticker() as applying:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    for start in range(0, records, 10_000):
                        await conn.execute(
                            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id,"
                            " op, data, field_meta, client_id) SELECT 'ai', 'aiMissions',"
                            " %s || i, 'u' || (i %% 100), 'insert', jsonb_build_object('id',"
                            " %s || i, 'title', 'stall ' || i, 'state', 'paused'), '{}', 'bench'"
                            " FROM generate_series(%s::int, %s::int) i",
                            (f"s{chunk}-", f"s{chunk}-", start, start + 9_999),
                        )
                await app.supervisor.sync_point(persisted=False)
            assert len(ing.missions) - base == records, (len(ing.missions), base)
            assert app.supervisor.term is not None
            fence = app.supervisor.term.fence
            dirty = ing.missions.dirty_count()
            async with Ticker() as persisting:
                t0 = time.perf_counter()
                await ing.persist(fence)
                took = time.perf_counter() - t0
            results.append(
                f"  {label:34s} apply: longest stall {applying.longest * 1000:7.1f} ms;"
                f" group commit of {dirty:,} records in {took:.2f} s:"
                f" longest stall {persisting.longest * 1000:7.1f} ms"
            )
            stop.set()
            await task
    print("longest event-loop stall (ms) while 100k-record transactions apply and persist:")
    print("\n".join(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=2000, help="rows per second")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rows-per-tx", type=int, default=10)
    ap.add_argument("--stall-records", type=int, default=100_000)
    args = ap.parse_args()
    with bench_server() as server:
        create_schema(server.dsn)
        print(f"PostgreSQL {server.version}")
        asyncio.run(run(server.dsn, args))


if __name__ == "__main__":
    main()
