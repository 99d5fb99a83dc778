"""Capture real pgoutput replication frames as unit-test data.

Run from the repository root:

    .venv/bin/python tests/data/capture_pgoutput.py

It starts a throwaway embedded PostgreSQL 18 server under /tmp (deleted afterwards),
creates a few tables and a publication for all tables, then, once per pgoutput protocol
version (1, then 2 with `streaming 'on'`), creates a slot, runs a fixed workload while
reading the slot with psycopg's libpq layer, and writes every XLogData frame plus a few
keepalives to `tests/data/pgoutput_v1.jsonl` / `pgoutput_v2.jsonl`:

    {"kind": "meta", ...}                       first line: server version, START_REPLICATION
    {"kind": "w", "tag": "I", "hex": "77..."}   an XLogData frame, the whole CopyData payload
    {"kind": "k", "reply": false, "hex": ...}   a primary keepalive frame

The workload covers every message type: Begin/Commit, Relation, Type (an enum column),
Insert/Update/Delete (REPLICA IDENTITY DEFAULT and FULL, an unchanged TOASTed value),
Truncate, transactional and non-transactional logical messages, an Origin (replication
origin session), and for protocol 2 three transactions just larger than
`logical_decoding_work_mem` (64kB, set on the replication connection) so they stream:
one commits, one aborts, one rolls back a subtransaction (SAVEPOINT / ROLLBACK TO) and
commits. The streamed ones insert into a table whose wide generated column fills the
server's reorder buffer without being sent, and stop growing as soon as the first Stream
Start arrives, which keeps the files small. Row ids tell the streamed
transactions apart: 1.. (commit), 2000001.. (abort), 3000001.. (subtransaction).

The capture does not use the project's codec, so a codec bug cannot shape its own data.
"""

from __future__ import annotations

import json
import select
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import conninfo, pq

from mission_runner.embedded import EmbeddedPostgres

OUT_DIR = Path(__file__).resolve().parent
PG_EPOCH_OFFSET_US = 946_684_800_000_000
REPLICATION_OPTIONS = "-c logical_decoding_work_mem=64kB -c wal_sender_timeout=5s"
MAX_KEEPALIVES = {False: 3, True: 2}  # kept per file, by reply-requested flag
ORIGIN = "capture_origin"

SCHEMA = """
DROP SCHEMA IF EXISTS public CASCADE;
CREATE SCHEMA public;
CREATE TYPE mood AS ENUM ('happy', 'sad', 'ok');
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, mood mood, qty int);
CREATE TABLE full_ident (id int, payload text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
-- `pad` counts against logical_decoding_work_mem (the reorder buffer holds whole heap
-- tuples) but is never sent: pgoutput leaves generated columns out by default. So a
-- transaction streams after ~35 rows, and each row costs the capture only its id.
-- (1800 bytes keeps the tuple under the TOAST threshold, uncompressed and inline.)
CREATE TABLE bulk (id int PRIMARY KEY, pad text GENERATED ALWAYS AS (repeat('x', 1800)) STORED);
CREATE TABLE scratch (id int);
CREATE TABLE sync_changes (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id          text        NOT NULL,
    table_name      text        NOT NULL,
    record_id       text        NOT NULL,
    user_id         text        NOT NULL,
    op              text        NOT NULL,
    data            jsonb,
    field_meta      jsonb       DEFAULT '{}',
    client_id       text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    schema_version  int         NOT NULL DEFAULT 1,
    actor           jsonb,
    origin          text,
    space_id        text
);
DROP PUBLICATION IF EXISTS p;
CREATE PUBLICATION p FOR ALL TABLES;
"""

SYNC_ROWS = [
    (
        "0b6f7c1e-3d2a-4f5b-9c8d-7e6f5a4b3c2d",
        "ai",
        "missions",
        "m-1",
        "user-42",
        "insert",
        '{"title": "Plan the week", "status": "active", "priority": 3, "tags": ["a", "b"]}',
        '{"title": {"ts": 1700000000123}}',
        "client-7f3a",
        "2024-05-30 10:00:00.123456+00",
        3,
        '{"kind": "user", "id": "user-42"}',
        "local",
        "space-1",
    ),
    (
        "1c7a8d2f-4e3b-4a6c-8d9e-8f7a6b5c4d3e",
        "ai",
        "missions",
        "m-1",
        "user-42",
        "update",
        '{"status": "done", "note": "café ✓"}',
        None,
        "client-7f3a",
        "2024-05-30 10:05:00+00",
        3,
        None,
        None,
        None,
    ),
    (
        "2d8b9e3a-5f4c-4b7d-9e0f-9a8b7c6d5e4f",
        "notes",
        "pages",
        "p-9",
        "user-7",
        "delete",
        None,
        "{}",
        "client-1",
        "2024-05-30 10:06:00+00",
        1,
        None,
        "import",
        None,
    ),
]


@dataclass(frozen=True)
class CapturedFrame:
    """One line of a capture file: `kind` 'w' (XLogData) or 'k' (keepalive), the raw
    CopyData payload, and for XLogData the pgoutput tag as recorded."""

    kind: str
    frame: bytes
    tag: str | None


def load_capture(proto: int) -> list[CapturedFrame]:
    """The frames of `pgoutput_v{proto}.jsonl`, in the order the server sent them."""
    frames = []
    with (OUT_DIR / f"pgoutput_v{proto}.jsonl").open() as lines:
        for line in lines:
            record = json.loads(line)
            if record["kind"] in ("w", "k"):
                frames.append(
                    CapturedFrame(record["kind"], bytes.fromhex(record["hex"]), record.get("tag"))
                )
    return frames


class ReplicationReader:
    """Reads one slot over a libpq replication connection and keeps the raw frames."""

    def __init__(self, dsn: str, command: str) -> None:
        info = conninfo.make_conninfo(dsn, replication="database", options=REPLICATION_OPTIONS)
        self.pgconn = pq.PGconn.connect(info.encode())
        if self.pgconn.status != pq.ConnStatus.OK:
            raise RuntimeError(self.pgconn.get_error_message())
        self.pgconn.send_query(command.encode())
        res = self.pgconn.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            message = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) if res else None
            raise RuntimeError(f"START_REPLICATION failed: {message!r}")
        self.pgconn.nonblocking = 1
        self.records: list[dict[str, object]] = []
        self.kept_keepalives = {False: 0, True: 0}
        self.wal_end = 0  # the server's WAL end as of the latest frame

    def pump(self, timeout: float, until: Callable[[bytes], bool] | None = None) -> bool:
        """Read frames for up to `timeout` seconds; True as soon as `until(frame)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            self.pgconn.consume_input()
            while True:
                nbytes, data = self.pgconn.get_copy_data(1)
                if nbytes == 0:
                    break
                if nbytes < 0:
                    raise RuntimeError(f"stream ended: {self.pgconn.get_error_message()!r}")
                frame = bytes(data)
                self._keep(frame)
                if until is not None and until(frame):
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self.pgconn.socket], [], [], min(remaining, 0.05))

    def _keep(self, frame: bytes) -> None:
        if frame[:1] == b"w":
            self.wal_end = max(self.wal_end, struct.unpack_from("!Q", frame, 9)[0])
            self.records.append({"kind": "w", "tag": chr(frame[25]), "hex": frame.hex()})
        elif frame[:1] == b"k":
            wal_end, _, reply = struct.unpack_from("!QqB", frame, 1)
            self.wal_end = max(self.wal_end, wal_end)
            if self.kept_keepalives[bool(reply)] < MAX_KEEPALIVES[bool(reply)]:
                self.kept_keepalives[bool(reply)] += 1
                self.records.append({"kind": "k", "reply": bool(reply), "hex": frame.hex()})
            if reply:  # answer at once, or wal_sender_timeout ends the connection
                now_pg = time.time_ns() // 1000 - PG_EPOCH_OFFSET_US
                update = struct.pack("!cQQQqB", b"r", wal_end, 0, 0, now_pg, 0)
                self.pgconn.put_copy_data(update)
                self.pgconn.flush()
        else:
            raise RuntimeError(f"unexpected frame {frame[:1]!r}")

    def catch_up(self, target_lsn: int, timeout: float = 20.0) -> None:
        if not self.pump(timeout, until=lambda _frame: self.wal_end >= target_lsn):
            raise RuntimeError(f"stream did not reach {target_lsn:X} in {timeout}s")

    def close(self) -> None:
        self.pgconn.finish()


def current_lsn(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(str(row[0]))


def basic_workload(conn: psycopg.Connection[tuple[object, ...]], origin_dsn: str) -> None:
    """Plain transactions covering every non-stream message type."""
    x = conn.execute
    x("INSERT INTO items VALUES (1, 'apple', 'happy', 3)")  # Type + Relation + Insert
    with conn.transaction():
        for row in SYNC_ROWS:
            x("INSERT INTO sync_changes VALUES (" + ", ".join(["%s"] * 14) + ")", row)
    x("UPDATE items SET qty = 4 WHERE id = 1")  # no old tuple
    x("UPDATE items SET id = 2 WHERE id = 1")  # key changed: 'K'
    with conn.transaction():  # REPLICA IDENTITY FULL: 'O'
        x("INSERT INTO full_ident VALUES (1, 'a'), (2, 'b')")
        x("UPDATE full_ident SET payload = 'c' WHERE id = 1")
        x("DELETE FROM full_ident WHERE id = 2")
    x("DELETE FROM items WHERE id = 2")  # 'K'
    x("INSERT INTO docs SELECT 1, string_agg(md5(g::text), '') , 1 FROM generate_series(1, 70) g")
    x("UPDATE docs SET n = 2 WHERE id = 1")  # body unchanged and TOASTed: 'u'
    with conn.transaction():
        x("INSERT INTO items VALUES (3, 'pear', 'sad', 1)")
        x("SELECT pg_logical_emit_message(true, 'mr', 'hello')")
    x("SELECT pg_logical_emit_message(false, 'mr-nt', '\\x00ff01'::bytea)")
    x("SELECT pg_logical_emit_message(false, 'mr-nt', 'ping')")
    x("SELECT pg_logical_emit_message(true, 'mr', 'alone')")  # a transaction of one message
    with psycopg.connect(origin_dsn, autocommit=True) as oconn:
        oconn.execute("SELECT pg_replication_origin_session_setup(%s)", (ORIGIN,))
        with oconn.transaction():
            oconn.execute(
                "SELECT pg_replication_origin_xact_setup('0/ABCDEF0', '2024-01-02 03:04:05+00')"
            )
            oconn.execute("INSERT INTO items VALUES (4, 'plum', 'ok', 2)")
        oconn.execute("SELECT pg_replication_origin_session_reset()")
    x("ALTER TABLE items ADD COLUMN note text")  # a second Relation for items
    x("INSERT INTO items VALUES (5, 'fig', NULL, NULL, 'late column')")
    x("TRUNCATE full_ident, docs RESTART IDENTITY CASCADE")
    x("TRUNCATE items")


def grow_until_streamed(
    conn: psycopg.Connection[tuple[object, ...]],
    flusher: psycopg.Connection[tuple[object, ...]],
    reader: ReplicationReader,
    first_id: int,
) -> int:
    """Insert rows into `bulk` in the open transaction on `conn` until the server starts
    streaming it; returns how many rows were inserted."""
    row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
    assert row is not None
    xid = int(str(row[0]))
    start = struct.pack("!cI", b"S", xid)
    inserted, batch = 0, 25
    while True:
        conn.execute(
            "INSERT INTO bulk SELECT generate_series(%s::int, %s::int)",
            (first_id + inserted, first_id + inserted + batch - 1),
        )
        inserted += batch
        batch = 5
        # Another transaction's commit flushes the WAL, so the walsender decodes ours.
        flusher.execute("SELECT pg_current_xact_id()")
        target = current_lsn(flusher)
        streamed = False

        def settled(frame: bytes, target: int = target) -> bool:
            nonlocal streamed
            streamed = streamed or frame[25:30] == start
            return streamed or (frame[:1] == b"k" and reader.wal_end >= target)

        reader.pump(3.0, until=settled)
        if streamed:
            return inserted
        if inserted > 2_000:
            raise RuntimeError("no Stream Start: is logical_decoding_work_mem applied?")


def streaming_workload(
    dsn: str, conn: psycopg.Connection[tuple[object, ...]], reader: ReplicationReader
) -> None:
    x = conn.execute
    with psycopg.connect(dsn, autocommit=True) as flusher:
        # S1: a streamed transaction that commits, with a plain one committed in between.
        with conn.transaction():
            grow_until_streamed(conn, flusher, reader, 1)
            flusher.execute("INSERT INTO items VALUES (10, 'kiwi', 'ok', 7, NULL)")
            x("INSERT INTO bulk VALUES (1000001), (1000002)")
            x("UPDATE bulk SET id = -1 WHERE id = 1")
            x("DELETE FROM bulk WHERE id = 2")
            x("SELECT pg_logical_emit_message(true, 'mr', 'in-stream')")
            x("TRUNCATE scratch")
        # S2: a streamed transaction (with a released subtransaction) that aborts.
        with conn.transaction():
            x("INSERT INTO bulk SELECT generate_series(2000001, 2000003)")
            x("SAVEPOINT a")
            x("INSERT INTO bulk SELECT generate_series(2000011, 2000013)")
            x("RELEASE a")
            grow_until_streamed(conn, flusher, reader, 2100000)
            raise psycopg.Rollback()  # leaves the `with` block, rolled back
        # S3: with an origin; a subtransaction streamed, then rolled back; commits.
        with psycopg.connect(dsn, autocommit=True) as oconn:
            y = oconn.execute
            y("SELECT pg_replication_origin_session_setup(%s)", (ORIGIN,))
            with oconn.transaction():
                y("SELECT pg_replication_origin_xact_setup('0/1234ABCD', now())")
                y("INSERT INTO bulk SELECT generate_series(3000001, 3000003)")
                y("SAVEPOINT keep")
                y("INSERT INTO bulk SELECT generate_series(3000011, 3000013)")
                y("RELEASE keep")
                y("SAVEPOINT drop")
                grow_until_streamed(oconn, flusher, reader, 3100000)
                y("ROLLBACK TO drop")
                y("INSERT INTO bulk SELECT generate_series(3000021, 3000023)")
            y("SELECT pg_replication_origin_session_reset()")


def capture(pg: EmbeddedPostgres, dsn: str, proto: int) -> None:
    slot = f"capture_v{proto}"
    options = f"proto_version '{proto}', publication_names 'p', messages 'true'"
    if proto >= 2:
        options += ", streaming 'on'"
    command = f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({options})"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "SELECT pg_replication_origin_create(%s) WHERE NOT EXISTS "
            "(SELECT 1 FROM pg_replication_origin WHERE roname = %s)",
            (ORIGIN, ORIGIN),
        )
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        version = conn.execute("SHOW server_version").fetchone()
        reader = ReplicationReader(dsn, command)
        try:
            basic_workload(conn, dsn)
            reader.pump(0.2)
            if proto >= 2:
                streaming_workload(dsn, conn, reader)
            reader.catch_up(current_lsn(conn))
            if reader.kept_keepalives[True] == 0:  # wait for one reply-requested keepalive
                reader.pump(4.0, until=lambda f: f[:1] == b"k" and f[17] == 1)
        finally:
            reader.close()
        for _ in range(50):  # the walsender needs a moment to let go of the slot
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
    meta = {
        "kind": "meta",
        "server_version": version[0] if version else None,
        "start_replication": command,
        "replication_options": REPLICATION_OPTIONS,
    }
    path = OUT_DIR / f"pgoutput_v{proto}.jsonl"
    with path.open("w") as out:
        for record in [meta, *reader.records]:
            out.write(json.dumps(record) + "\n")
    tags = "".join(str(r["tag"]) for r in reader.records if r["kind"] == "w")
    size = path.stat().st_size
    print(f"{path.name}: {len(reader.records)} frames, {size} bytes, tags {tags[:60]}...")


def main() -> int:
    tmpdir = tempfile.mkdtemp(prefix="pgcap-", dir="/tmp")
    pg = EmbeddedPostgres(Path(tmpdir), delete_on_exit=True)
    try:
        dsn = pg.start()
        for proto in (1, 2):
            capture(pg, dsn, proto)
    finally:
        pg.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
