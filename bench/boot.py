"""Start-up: booting from persisted snapshots vs rebuilding from the log (target <= 1/20).

After N events (default 1M) over M missions (default 10k), measure the time from opening the
service to "streaming" (i) from the persisted snapshots and checkpoint, and (ii) after
`rebuild` (discard snapshots, new slot, load the table in its snapshot). Both in-process,
same code path as `mission-runner run`; process start-up (imports) is reported apart.

    .venv/bin/python bench/boot.py [--events 1000000] [--missions 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import bench_server, create_schema, insert_missions  # noqa: E402
from mission_runner.app import open_app  # noqa: E402
from mission_runner.cli import prepare_database  # noqa: E402
from mission_runner.settings import Settings  # noqa: E402
from projections import persistence  # noqa: E402
from writer.fence import Fence  # noqa: E402


async def start_to_streaming(dsn: str, *, rebuild: bool) -> tuple[float, int]:
    settings = replace(Settings.from_env({}), database_url=dsn)
    started = time.perf_counter()
    async with open_app(settings, dsn=dsn) as app:
        ing = app.ingest
        await prepare_database(app)

        async def discard(conn: psycopg.AsyncConnection[tuple[object, ...]], fence: Fence) -> None:
            await persistence.reset(conn, fence)

        stop = asyncio.Event()
        task = asyncio.create_task(app.supervisor.run(stop, prepare=discard if rebuild else None))
        while not app.supervisor.streaming.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started
        missions = len(ing.missions)
        stop.set()
        await task
    return elapsed, missions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--missions", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with bench_server() as server:
        dsn = server.dsn
        create_schema(dsn)
        t0 = time.perf_counter()
        insert_missions(dsn, rows=args.events, missions=args.missions, tx_size=5000)
        print(
            f"PostgreSQL {server.version}: {args.events} events over {args.missions} missions"
            f" written in {time.perf_counter() - t0:.1f} s"
        )
        rebuilds, boots = [], []
        for _ in range(args.rounds):
            seconds, missions = asyncio.run(start_to_streaming(dsn, rebuild=True))
            assert missions == args.missions, missions
            rebuilds.append(seconds)
            seconds, missions = asyncio.run(start_to_streaming(dsn, rebuild=False))
            assert missions == args.missions, missions
            boots.append(seconds)
        imports = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", "import mission_runner.cli"], check=True, cwd=ROOT
            )
            imports.append(time.perf_counter() - t0)
        rebuild_s, boot_s = statistics.median(rebuilds), statistics.median(boots)
        print(
            f"  rebuild to streaming:                  {rebuild_s:7.3f} s (median of "
            f"{args.rounds}: {', '.join(f'{s:.3f}' for s in rebuilds)})"
        )
        print(
            f"  boot from persisted state to streaming: {boot_s:7.3f} s (median of "
            f"{args.rounds}: {', '.join(f'{s:.3f}' for s in boots)})"
        )
        print(f"  ratio boot / rebuild: 1/{rebuild_s / boot_s:.0f}")
        print(
            f"  (process start and imports, not in either figure: "
            f"{statistics.median(imports):.2f} s)"
        )


if __name__ == "__main__":
    main()
