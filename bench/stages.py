"""Per-stage CPU cost of the ingest pipeline, in µs per row, on frames from a real server.

The whole pipeline runs on one asyncio thread, so its throughput is set by the sum of these
per-row costs. This captures the replication stream of the `bench/ingest.py` workload into
memory once, then times each stage on it. Each stage keeps alive what the service keeps
(merged states, a batch being persisted) and drops what the service drops (a transaction
once applied, a decoded row once merged):

    stream     CopyData payloads -> committed transactions: the consumer's frame loop
               (FrameReader.pump and feed: frame codec, pgoutput decoder, transaction
               assembler), from an in-memory stand-in for libpq's get_copy_data
    decode     a row's tuple -> ChangeRow (picking the columns, `decode_columns`)
    merge      SnapshotStore.apply: ChangeRow -> merged record states
    project    Projector.apply_transaction: decode + merge + bookkeeping, per row; through
               the compiled fold when it is built (decode and merge above time the Python
               functions it stands in for); `--python-paths` times the Python paths alone
               here and in `stream` (the reader and the projector built with compiled=False)
    serialize  persistence.serialize, per dirty record (µs/record)
    persist    persistence.write_batch into the benchmark database, per record
               (client and server time together, µs/record)

`--field-meta msgspec` (or `both`, side by side) times `project` with the compiled fold reading
`field_meta` through msgspec's typed decoder (`dict[str, str | Stamp]`, a Stamp holding only
`at`) instead of its in-place scanner; it needs `pip install msgspec`.

Each figure is the best of `--repeat` runs. With `--gc both` (the default) every stage is
timed under the interpreter's default cyclic-GC settings and again after
`mission_runner.runtime.tune_gc()`; `--heap N` keeps N more snapshots alive meanwhile, as in
a service that loaded them at boot, which is where the collector's cost shows.

    .venv/bin/python bench/stages.py [--rows 100000] [--missions 10000] [--repeat 3]
                                     [--gc both] [--heap 0] [--python-paths]
                                     [--field-meta scanner|msgspec|both]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import bench_server, create_schema, insert_missions  # noqa: E402
from core.lsn import Lsn  # noqa: E402
from mission_runner.migrations import migrate  # noqa: E402
from mission_runner.runtime import tune_gc  # noqa: E402
from projections import fastpath, persistence  # noqa: E402
from projections.decode import Picker, column_indexes, decode_columns, picker  # noqa: E402
from projections.merge import RecordState, make_key  # noqa: E402
from projections.persistence import Checkpoint, PersistBatch, SnapshotRow  # noqa: E402
from projections.projector import Projector  # noqa: E402
from projections.rows import ChangeRow  # noqa: E402
from projections.stores import SnapshotStore  # noqa: E402
from stream.frames import PrimaryKeepalive, parse_frame  # noqa: E402
from stream.pgoutput import TupleData  # noqa: E402
from stream.reader import FrameReader  # noqa: E402
from stream.slots import publication_ddl  # noqa: E402
from stream.transactions import CommittedTransaction  # noqa: E402
from writer.fence import take_leadership  # noqa: E402

PUBLICATION = "mission_runner"
SLOT = "stages"
START_OPTIONS = "proto_version '2', publication_names 'mission_runner', streaming 'on'"


def capture(dsn: str, end: Lsn) -> list[bytes]:
    """Every CopyData payload of the slot's stream up to WAL position `end`."""
    conn = psycopg.connect(
        dsn, autocommit=True, replication="database", options="-c timezone=UTC -c datestyle=ISO"
    )
    try:
        pgconn = conn.pgconn
        pgconn.send_query(f"START_REPLICATION SLOT {SLOT} LOGICAL 0/0 ({START_OPTIONS})".encode())
        while (res := pgconn.get_result()) is not None:
            if res.status == pq.ExecStatus.COPY_BOTH:
                break
            raise RuntimeError(f"START_REPLICATION failed: {res.error_message!r}")
        frames: list[bytes] = []
        while True:
            nbytes, data = pgconn.get_copy_data(0)  # blocking
            if nbytes < 0:
                raise RuntimeError("the replication stream ended early")
            buf = bytes(data)
            frame = parse_frame(buf)
            if isinstance(frame, PrimaryKeepalive):
                if frame.wal_end >= end:
                    return frames
                continue
            frames.append(buf)
            if frame.wal_start >= end:
                return frames
    finally:
        conn.close()


@dataclass
class Workload:
    """What each stage takes as input, built once (untimed) from the captured frames."""

    frames: list[memoryview]  # as the consumer gets them from libpq
    transactions: list[CommittedTransaction]
    values: list[TupleData]  # each inserted row's tuple
    pick: Picker  # sync_changes tuple -> COLUMNS values
    rows: list[ChangeRow]
    lsn: Lsn
    commit_time_us: int
    compiled: bool = True  # the compiled helpers, where built (False: --python-paths)
    field_meta: list[str] = field(default_factory=lambda: ["scanner"])

    @classmethod
    def build(cls, frames: list[bytes]) -> Workload:
        reader = FrameReader(2)
        transactions = []
        for buf in frames:
            out = reader.feed(buf)
            if isinstance(out, CommittedTransaction):
                transactions.append(out)
        relation = next(t.inserts[0][0] for t in transactions if t.inserts)
        idx = column_indexes(tuple(c.name for c in relation.columns))
        assert idx is not None
        pick = picker(idx)
        values = [v for t in transactions for _, v in t.inserts]
        rows = [r for v in values if isinstance(r := decode_columns(pick(v)), ChangeRow)]
        last = transactions[-1]
        return cls(
            [memoryview(f) for f in frames],
            transactions,
            values,
            pick,
            rows,
            last.commit_lsn,
            last.commit_time_us,
        )


class CopyData:
    """psycopg's `PGconn.get_copy_data` over the captured frames: `(size, memoryview)`, then
    `(-1, ...)` once they are all out (the end of the copy)."""

    def __init__(self, frames: list[memoryview]) -> None:
        self._next = iter(frames).__next__

    def __call__(self, async_: bool) -> tuple[int, memoryview]:
        try:
            data = self._next()
        except StopIteration:
            return -1, memoryview(b"")
        return len(data), data


def stream(w: Workload) -> object:
    """The consumer's frame loop (`FrameReader.pump`, then `feed` for each frame it hands
    back); each transaction is dropped once out, as the service drops it once applied.
    Includes the stand-in for libpq's get_copy_data above (about what psycopg's costs)."""
    reader = FrameReader(2, compiled=w.compiled)
    pump, feed = reader.pump, reader.feed
    get_copy_data = CopyData(w.frames)
    while True:
        _, _, rest = pump(get_copy_data, 2000)
        if isinstance(rest, bytes):
            feed(rest)
        elif rest is not None:
            return None


def decode(w: Workload) -> object:
    """Picking a row's columns out of its tuple and decoding them."""
    pick = w.pick
    for values in w.values:
        decode_columns(pick(values))
    return None


def merge(w: Workload) -> object:
    missions = SnapshotStore("mission")
    for row in w.rows:
        missions.apply(row, w.lsn, w.commit_time_us)
    return missions


def project(w: Workload, meta_loads: Callable[[bytes], object] | None = None) -> object:
    projector = Projector(
        missions=SnapshotStore("mission"), agents=SnapshotStore("agent"), compiled=w.compiled
    )
    if meta_loads is not None:
        # The fold with field_meta parsed by `meta_loads` instead of the in-place scanner.
        projector._fold = fastpath.compiled_fold(meta_loads=meta_loads)
        assert projector._fold is not None, "projections._speedups is not built"
    for tx in w.transactions:
        projector.apply_transaction(tx)
    return projector


def msgspec_field_meta() -> Callable[[bytes], object]:
    """msgspec's typed decoding of field_meta: legacy string stamps as str, object stamps as
    a Struct holding `at` alone (msgspec skips the other keys: actor, origin, ...)."""
    import msgspec

    class Stamp(msgspec.Struct):
        at: str | None = None

    decode: Callable[[bytes], object] = msgspec.json.Decoder(dict[str, str | Stamp]).decode
    return decode


@dataclass
class Timing:
    name: str
    unit: str
    per_item: dict[str, float]


def best_of(repeat: int, items: int, run: Callable[[], object]) -> float:
    """The fastest of `repeat` runs, in µs per item; each run's result stays alive until
    the run is timed, as the service keeps what it builds."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - started
        del result
        best = min(best, elapsed)
    return best / items * 1e6


def time_stages(w: Workload, dsn: str, repeat: int) -> dict[str, float]:
    rows = len(w.values)
    out = {
        "stream": best_of(repeat, rows, lambda: stream(w)),
        "decode": best_of(repeat, rows, lambda: decode(w)),
        "merge": best_of(repeat, rows, lambda: merge(w)),
    }
    # With both, the two take turns, so drifts of the machine fall on both alike.
    for _ in range(repeat if len(w.field_meta) > 1 else 1):
        for how in w.field_meta:
            name = "project" if how == "scanner" else "project/msgspec"
            loads = msgspec_field_meta() if how == "msgspec" else None
            runs = 1 if len(w.field_meta) > 1 else repeat
            took = best_of(runs, rows, lambda loads=loads: project(w, loads))
            out[name] = min(out.get(name, float("inf")), took)
    states = list(merge(w))  # every record dirty once, as after a busy batch
    out["serialize"] = best_of(
        repeat, len(states), lambda: [persistence.serialize(s) for s in states]
    )
    snapshot_rows = [persistence.serialize(s) for s in states]
    out["persist"] = best_of(repeat, len(states), lambda: write(dsn, snapshot_rows, w.lsn))
    return out


def write(dsn: str, rows: list[SnapshotRow], lsn: Lsn) -> None:
    batch = PersistBatch(rows, [], [], Checkpoint(SLOT, lsn, None))

    async def run() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        try:
            fence = await take_leadership(conn, SLOT)  # a term of its own, as the service's
            await persistence.write_batch(conn, batch, fence)
        finally:
            await conn.close()

    asyncio.run(run())


UNITS = {"serialize": "µs/record", "persist": "µs/record (client + server)"}
NOTES = {
    "stream": "frames, pgoutput, transactions",
    "project": "decode + merge + bookkeeping",
    "project/msgspec": "the same, field_meta through msgspec",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--missions", type=int, default=10_000)
    ap.add_argument("--tx-size", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gc", choices=["default", "tuned", "both"], default="both")
    ap.add_argument(
        "--heap",
        type=int,
        default=0,
        metavar="N",
        help="keep N more snapshots alive while timing, like a service that booted with them",
    )
    ap.add_argument(
        "--python-paths",
        action="store_true",
        help="time the Python paths alone (the reader and the projector without compiled helpers)",
    )
    ap.add_argument(
        "--field-meta",
        choices=["scanner", "msgspec", "both"],
        default="scanner",
        help="how the compiled fold reads field_meta in `project` (both: side by side)",
    )
    args = ap.parse_args()

    with bench_server() as server:
        dsn = server.dsn
        create_schema(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(publication_ddl(PUBLICATION, conn.info.server_version))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
        insert_missions(dsn, rows=args.rows, missions=args.missions, tx_size=args.tx_size)
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            end = Lsn.parse(str(row[0]))
        frames = capture(dsn, end)
        # The tables persistence writes to (the service creates them at boot).
        asyncio.run(_migrate(dsn))
        workload = Workload.build(frames)
        workload.compiled = not args.python_paths
        both = args.field_meta == "both"
        workload.field_meta = ["scanner", "msgspec"] if both else [args.field_meta]
        del frames
        booted = booted_heap(args.heap)
        print(
            f"PostgreSQL {server.version}, Python {sys.version.split()[0]}: "
            f"{len(workload.values)} mission rows over {args.missions} missions in "
            f"transactions of {args.tx_size} ({len(workload.frames)} frames); "
            f"{len(booted)} more snapshots alive; best of {args.repeat}"
        )
        columns: dict[str, dict[str, float]] = {}
        if args.gc in ("default", "both"):
            columns["default GC"] = time_stages(workload, dsn, args.repeat)
        if args.gc in ("tuned", "both"):
            tune_gc()
            columns["tune_gc()"] = time_stages(workload, dsn, args.repeat)
    print_table(columns)


def booted_heap(records: int) -> list[RecordState]:
    """Snapshots like those a service loads at boot: ten fields each, some of them nested,
    so the cyclic collector has as many objects to walk as a real heap of that size."""
    heap = []
    for i in range(records):
        state = RecordState("u", f"m{i}", exists=True)
        for f in range(10):
            name = f"field{f}"
            state.values[name] = {"kind": "daily", "at": [i, f]} if f % 2 else f"text {i}"
            state.keys[name] = make_key(i, i, "event")
        heap.append(state)
    return heap


async def _migrate(dsn: str) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await migrate(conn)
    finally:
        await conn.close()


def print_table(columns: dict[str, dict[str, float]]) -> None:
    names = list(columns)
    print(f"{'stage':<16}" + "".join(f"{n:>12}" for n in names) + "  unit")
    stages = next(iter(columns.values()))
    for stage in stages:
        figures = "".join(f"{columns[n][stage]:12.2f}" for n in names)
        note = f"  ({NOTES[stage]})" if stage in NOTES else ""
        print(f"{stage:<16}{figures}  {UNITS.get(stage, 'µs/row')}{note}")
    totals = "".join(f"{columns[n]['stream'] + columns[n]['project']:12.2f}" for n in names)
    print(f"{'per row':<16}{totals}  µs/row  (stream + project: the CPU each row costs)")


if __name__ == "__main__":
    main()
