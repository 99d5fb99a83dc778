"""The asyncio helpers: cancellation of the caller always propagates."""

from __future__ import annotations

import asyncio

import pytest

from core.aio import Stopped, race_stop, sleep_or_stop, wait_first


async def _slow_to_cancel(cleanup: asyncio.Event) -> None:
    """Like a query being cancelled: it takes a while to end after the cancel arrives."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await cleanup.wait()
        raise


async def test_race_stop_returns_the_result_or_raises_stopped() -> None:
    stop = asyncio.Event()
    assert await race_stop(asyncio.sleep(0, "done"), stop) == "done"
    stop.set()
    with pytest.raises(Stopped):
        await race_stop(asyncio.sleep(3600), stop)


async def test_a_caller_cancelled_while_race_stop_gives_up_stays_cancelled() -> None:
    stop, cleanup = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(race_stop(_slow_to_cancel(cleanup), stop))
    await asyncio.sleep(0)
    stop.set()  # race_stop cancels the awaitable and waits for it to end...
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()  # ...and is cancelled itself meanwhile
    cleanup.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_caller_cancelled_while_racing_stays_cancelled() -> None:
    stop, cleanup = asyncio.Event(), asyncio.Event()
    cleanup.set()
    task = asyncio.create_task(race_stop(_slow_to_cancel(cleanup), stop))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_sleep_or_stop_and_wait_first() -> None:
    stop = asyncio.Event()
    assert await sleep_or_stop(stop, 0.001) is False
    stop.set()
    assert await sleep_or_stop(stop, 3600) is True
    other = asyncio.Event()
    assert await wait_first(other, within=0.001) is None
    assert await wait_first(other, stop) is stop
