"""Ingest throughput: `mission-runner catch-up` vs `pg_recvlogical` over the same WAL range.

Both read the same slot position, with the same publication and protocol options; the
ratio of their row rates is the figure (target: catch-up >= 0.6x pg_recvlogical).

    .venv/bin/python bench/ingest.py [--rows 300000] [--tx-size 1000] [--missions 10000]
                                     [--repeat 1] [--env NAME=VALUE ...] [--cli-module M]

Both compete for the same two cores with the server's walsender, so figures move with
whatever else the machine runs: take several rounds (`--repeat`) and read the median. The
catch-up line also gives the CPU time the command used, which moves less.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import bench_server, create_schema, insert_missions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--tx-size", type=int, default=1000)
    ap.add_argument("--missions", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=1, help="rounds, each on fresh slots")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for catch-up")
    ap.add_argument(
        "--cli-module",
        default="mission_runner.cli",
        help="the module run as `python -m` for catch-up (to measure a wrapped or patched CLI)",
    )
    args = ap.parse_args()

    with bench_server() as server:
        dsn = server.dsn
        create_schema(dsn)
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "LOG_LEVEL": "warning",
            **dict(e.split("=", 1) for e in args.env),
        }
        cli = [sys.executable, "-m", args.cli_module]
        print(
            f"PostgreSQL {server.version}; {args.rows} mission rows in transactions of "
            f"{args.tx_size}, over {args.missions} missions"
        )
        ratios: list[float] = []
        for rnd in range(args.repeat):
            slot = f"mission_runner_{rnd}"
            recv_slot = f"recvlogical_{rnd}"
            env["MISSION_RUNNER_SLOT"] = slot
            # Our slot and checkpoint first (empty table), then pg_recvlogical's slot.
            subprocess.run(
                [*cli, "catch-up"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
            )
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (recv_slot,)
                )
            t0 = time.perf_counter()
            insert_missions(dsn, rows=args.rows, missions=args.missions, tx_size=args.tx_size)
            load_s = time.perf_counter() - t0
            with psycopg.connect(dsn, autocommit=True) as conn:
                if rnd == 0:
                    sizes = conn.execute(
                        "SELECT round(avg(octet_length(data::text))),"
                        " round(avg(octet_length(field_meta::text))) FROM sync_changes"
                    ).fetchone()
                    assert sizes is not None
                    print(
                        f"rows as JSON text: data {sizes[0]} B, field_meta {sizes[1]} B on average"
                    )
                row = conn.execute(
                    "SELECT pg_current_wal_lsn()::text,"
                    " pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(),"
                    " (SELECT restart_lsn FROM pg_replication_slots"
                    "  WHERE slot_name = %s)))",
                    (recv_slot,),
                ).fetchone()
                assert row is not None
                endpos, wal = str(row[0]), str(row[1])
            print(f"round {rnd + 1}: loaded in {load_s:.1f} s, {wal} of WAL, end {endpos}")

            recv = [
                "-d",
                dsn,
                "--slot",
                recv_slot,
                "--start",
                "--endpos",
                endpos,
                "-f",
                "/dev/null",
                "--no-loop",
                "-o",
                "proto_version=2",
                "-o",
                "publication_names=mission_runner",
                "-o",
                "messages=true",
                "-o",
                "streaming=on",
            ]
            t0 = time.perf_counter()
            server.run_program("pg_recvlogical", recv)
            recv_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            cpu0 = _children_cpu()
            out = subprocess.run(
                [*cli, "catch-up"], env=env, check=True, cwd=ROOT, capture_output=True, text=True
            )
            ours_s = time.perf_counter() - t0
            ours_cpu = _children_cpu() - cpu0
            print("  " + out.stdout.strip())

            recv_rate = args.rows / recv_s
            ours_rate = args.rows / ours_s
            print(f"  pg_recvlogical to /dev/null: {recv_s:6.2f} s  {recv_rate:10,.0f} rows/s")
            print(
                f"  mission-runner catch-up:     {ours_s:6.2f} s  {ours_rate:10,.0f} rows/s"
                f"  (whole command: start, boot, stream, persist, confirm; {ours_cpu:.2f} s CPU)"
            )
            ratios.append(ours_rate / recv_rate)
            print(f"  ratio catch-up / pg_recvlogical: {ratios[-1]:.2f}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (recv_slot,))
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                conn.execute("TRUNCATE sync_changes")
                conn.execute(
                    "TRUNCATE mana_ai.mission_snapshots, mana_ai.agent_snapshots,"
                    " mana_ai.stream_checkpoint"
                )
        if len(ratios) > 1:
            print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.2f}")


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
