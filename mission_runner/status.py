"""Reading the service's position and lag from the database (the `status` command).

Works with no consumer connected: everything comes from the slot, `pg_stat_replication` and
our own tables. Lag in seconds has one definition (`stream.lag`); from outside the process
only part of it can be known, and the output says which:

- 0 when the slot has confirmed everything the server has written;
- otherwise unknown (the service knows it: `/api/status`, `mana_ai_replication_lag_seconds`),
  with an upper bound: the snapshots are complete at least up to the commit time of the
  last persisted transaction, so they are at most `now - that` behind.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

import psycopg
from psycopg.rows import dict_row, scalar_row

from core.instants import datetime_to_us
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
    epoch: int | None


class SenderStatus(TypedDict):
    """The slot's walsender, from `pg_stat_replication` (None when nobody streams)."""

    pid: int
    state: str | None
    sent_lsn: str | None
    flush_lsn: str | None
    flush_lag_seconds: float | None
    reply_age_seconds: float | None


class Status(TypedDict):
    slot: SlotStatus
    sender: SenderStatus | None
    checkpoint: CheckpointStatus
    lag_seconds: float | None
    lag_seconds_at_most: float | None
    lag_note: str
    snapshots: dict[str, dict[str, int]]
    dead_letters: int


Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def _scalar(conn: Conn, query: str) -> int:
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute(query)
        value = await cur.fetchone()
    assert isinstance(value, int)
    return value


async def _has_schema(conn: Conn) -> bool:
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute("SELECT to_regclass('mana_ai.stream_checkpoint') IS NOT NULL")
        return bool(await cur.fetchone())


async def _sender(conn: Conn, pid: int | None) -> SenderStatus | None:
    if pid is None:
        return None
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT pid, state, sent_lsn::text AS sent, flush_lsn::text AS flush,"
            " extract(epoch FROM flush_lag)::float8 AS flush_lag,"
            " extract(epoch FROM now() - reply_time)::float8 AS reply_age"
            " FROM pg_stat_replication WHERE pid = %s",
            (pid,),
        )
        row = await cur.fetchone()
    if row is None:
        return None
    return SenderStatus(
        pid=int(row["pid"]),
        state=row["state"],
        sent_lsn=row["sent"],
        flush_lsn=row["flush"],
        flush_lag_seconds=row["flush_lag"],
        reply_age_seconds=row["reply_age"],
    )


async def _checkpoint(conn: Conn, slot: str) -> CheckpointStatus:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT lsn::text AS lsn, commit_time, epoch FROM mana_ai.stream_checkpoint"
            " WHERE slot_name = %s",
            (slot,),
        )
        row = await cur.fetchone()
    if row is None:
        return CheckpointStatus(lsn=None, commit_time_us=None, epoch=None)
    commit_time = row["commit_time"]
    return CheckpointStatus(
        lsn=row["lsn"],
        commit_time_us=datetime_to_us(commit_time) if isinstance(commit_time, datetime) else None,
        epoch=int(row["epoch"]),
    )


def _lag(
    lag_bytes: int | None, checkpoint: CheckpointStatus, now_us: int
) -> tuple[float | None, float | None, str]:
    if lag_bytes is None:
        return None, None, "no slot: nothing streams"
    if lag_bytes <= 0:
        return 0.0, 0.0, "the slot has confirmed everything the server has written"
    commit = checkpoint["commit_time_us"]
    at_most = None if commit is None else max(0.0, (now_us - commit) / 1_000_000)
    return (
        None,
        at_most,
        f"{lag_bytes} bytes of WAL not confirmed: how old they are cannot be known from"
        " outside the service (see its /api/status or mana_ai_replication_lag_seconds);"
        " the persisted snapshots are at most lag_seconds_at_most behind",
    )


async def collect_status(conn: Conn, *, slot: str) -> Status:
    lag = await slots.slot_lag(conn, slot)
    info = await slots.get_slot(conn, slot)
    checkpoint = CheckpointStatus(lsn=None, commit_time_us=None, epoch=None)
    counts: dict[str, dict[str, int]] = {}
    dead = 0
    if await _has_schema(conn):
        checkpoint = await _checkpoint(conn, slot)
        counts = await persistence.snapshot_counts(conn)
        dead = await _scalar(conn, "SELECT count(*) FROM mana_ai.dead_letter")
    now_us = await _scalar(conn, "SELECT (extract(epoch FROM now()) * 1000000)::bigint")
    seconds, at_most, note = _lag(lag.lag_bytes if lag else None, checkpoint, now_us)
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
        sender=await _sender(conn, info.active_pid if info else None),
        checkpoint=checkpoint,
        lag_seconds=seconds,
        lag_seconds_at_most=at_most,
        lag_note=note,
        snapshots=counts,
        dead_letters=dead,
    )


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} s"


def format_status(status: Status) -> str:
    s = status["slot"]
    if not s["exists"]:
        state = "missing"
    else:
        holder = f"active (pid {s['active_pid']})" if s["active"] else "inactive"
        state = f"{holder}, wal_status {s['wal_status']}"
    lines = [f"slot {s['name']}: {state}"]
    if s["exists"]:
        lines.append(
            f"  confirmed flush {s['confirmed_flush_lsn']}, server WAL {s['current_wal_lsn']}"
        )
        lag = _seconds(status["lag_seconds"])
        if status["lag_seconds"] is None and status["lag_seconds_at_most"] is not None:
            lag += f" (at most {status['lag_seconds_at_most']:.1f} s)"
        lines.append(
            f"  lag {s['lag_bytes']} bytes, {lag}; retained WAL {s['retained_wal_bytes']}"
            f" bytes; safe WAL {s['safe_wal_bytes']}"
        )
        lines.append(f"  {status['lag_note']}")
    sender = status["sender"]
    if sender is not None:
        lines.append(
            f"walsender pid {sender['pid']}: {sender['state']}, flushed {sender['flush_lsn']},"
            f" last reply {_seconds(sender['reply_age_seconds'])} ago"
        )
    cp = status["checkpoint"]
    lines.append(f"checkpoint {cp['lsn'] or 'none'} (leader epoch {cp['epoch'] or 'none'})")
    for kind, c in status["snapshots"].items():
        lines.append(f"{kind} snapshots: {c['live']} live, {c['deleted']} deleted")
    lines.append(f"dead letters: {status['dead_letters']}")
    return "\n".join(lines)
