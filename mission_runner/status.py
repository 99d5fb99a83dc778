"""Reading the service's position and lag from the database (for `status` and the HTTP API).

Works with no consumer connected: everything comes from the slot and our own tables.
"""

from __future__ import annotations

from typing import TypedDict

import psycopg

from projections import persistence
from stream import slots


class SlotStatus(TypedDict):
    name: str
    exists: bool
    active: bool
    active_pid: int | None
    wal_status: str | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    current_wal_lsn: str | None
    lag_bytes: int | None
    retained_wal_bytes: int | None
    safe_wal_bytes: int | None
    spill_bytes: int | None
    stream_bytes: int | None


class CheckpointStatus(TypedDict):
    lsn: str | None
    commit_time_us: int | None


class Status(TypedDict):
    slot: SlotStatus
    checkpoint: CheckpointStatus
    lag_seconds: float | None
    snapshots: dict[str, dict[str, int]]
    dead_letters: int


async def _has_schema(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
    cur = await conn.execute("SELECT to_regclass('mana_ai.stream_checkpoint') IS NOT NULL")
    row = await cur.fetchone()
    return bool(row and row[0])


async def collect_status(
    conn: psycopg.AsyncConnection[tuple[object, ...]], *, slot: str
) -> Status:
    lag = await slots.slot_lag(conn, slot)
    info = await slots.get_slot(conn, slot)
    checkpoint = None
    counts: dict[str, dict[str, int]] = {}
    dead = 0
    if await _has_schema(conn):
        checkpoint = await persistence.read_checkpoint(conn, slot)
        counts = await persistence.snapshot_counts(conn)
        cur = await conn.execute("SELECT count(*) FROM mana_ai.dead_letter")
        row = await cur.fetchone()
        dead = int(str(row[0])) if row else 0
    # Seen from outside the service: 0 when the slot has confirmed everything the server
    # wrote, else the time since our checkpoint last moved (the service's own, finer figure
    # is mana_ai_replication_lag_seconds).
    lag_seconds: float | None = None
    if lag is not None and lag.lag_bytes is not None:
        lag_seconds = 0.0
        if lag.lag_bytes > 0 and await _has_schema(conn):
            cur = await conn.execute(
                "SELECT (extract(epoch from now() - updated_at))::float8"
                " FROM mana_ai.stream_checkpoint WHERE slot_name = %s",
                (slot,),
            )
            row = await cur.fetchone()
            if row is not None and row[0] is not None:
                lag_seconds = max(0.0, float(str(row[0])))
    return Status(
        slot=SlotStatus(
            name=slot,
            exists=info is not None,
            active=bool(info and info.active),
            active_pid=info.active_pid if info else None,
            wal_status=lag.wal_status if lag else None,
            confirmed_flush_lsn=str(lag.confirmed_flush_lsn)
            if lag and lag.confirmed_flush_lsn
            else None,
            restart_lsn=str(lag.restart_lsn) if lag and lag.restart_lsn else None,
            current_wal_lsn=str(lag.current_lsn) if lag else None,
            lag_bytes=lag.lag_bytes if lag else None,
            retained_wal_bytes=lag.retained_bytes if lag else None,
            safe_wal_bytes=lag.safe_wal_size if lag else None,
            spill_bytes=lag.spill_bytes if lag else None,
            stream_bytes=lag.stream_bytes if lag else None,
        ),
        checkpoint=CheckpointStatus(
            lsn=str(checkpoint.lsn) if checkpoint else None,
            commit_time_us=checkpoint.commit_time_us if checkpoint else None,
        ),
        lag_seconds=lag_seconds,
        snapshots=counts,
        dead_letters=dead,
    )


def format_status(status: Status) -> str:
    s = status["slot"]
    lines = [
        f"slot {s['name']}: "
        + (
            "missing"
            if not s["exists"]
            else (
                f"{'active (pid ' + str(s['active_pid']) + ')' if s['active'] else 'inactive'}, "
                f"wal_status {s['wal_status']}"
            )
        )
    ]
    if s["exists"]:
        lines.append(
            f"  confirmed flush {s['confirmed_flush_lsn']}, server WAL {s['current_wal_lsn']}"
        )
        lines.append(
            f"  lag {s['lag_bytes']} bytes, {status['lag_seconds']} s; retained WAL "
            f"{s['retained_wal_bytes']} bytes; safe WAL {s['safe_wal_bytes']}"
        )
    cp = status["checkpoint"]
    lines.append(f"checkpoint {cp['lsn'] or 'none'}")
    for kind, c in status["snapshots"].items():
        lines.append(f"{kind} snapshots: {c['live']} live, {c['deleted']} deleted")
    lines.append(f"dead letters: {status['dead_letters']}")
    return "\n".join(lines)
