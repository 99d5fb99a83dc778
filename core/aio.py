"""Small asyncio helpers every long-running loop uses: waiting for a stop signal or a
timeout, and racing an awaitable against the stop signal.

Invariant: cancellation of the caller always propagates (`CancelledError` is re-raised);
the helpers cancel and reap what they started, so nothing is left pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def sleep_or_stop(stop: asyncio.Event, seconds: float | None) -> bool:
    """Wait until `stop` is set or `seconds` passed (None: no limit). True when `stop`
    is set."""
    if stop.is_set():
        return True
    if seconds is not None and seconds <= 0:
        await asyncio.sleep(0)
        return stop.is_set()
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return stop.is_set()
    return True


async def wait_first(*events: asyncio.Event, within: float | None = None) -> asyncio.Event | None:
    """Wait until one of `events` is set; returns it (the first in argument order among
    those set), or None after `within` seconds (None: no limit)."""
    for event in events:
        if event.is_set():
            return event
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    for event in events:
        if event.is_set():
            return event
    return None


class Stopped(Exception):
    """`race_stop` saw the stop signal before the awaitable finished."""


async def race_stop(awaitable: Awaitable[T], stop: asyncio.Event) -> T:
    """The result of `awaitable`, or `Stopped` if `stop` is set first (the awaitable is then
    cancelled and awaited). Exceptions of the awaitable propagate."""
    task = asyncio.ensure_future(awaitable)
    if stop.is_set():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise Stopped
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        stopping.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
        raise
    stopping.cancel()
    await asyncio.gather(stopping, return_exceptions=True)
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise Stopped
