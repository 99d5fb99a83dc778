"""Start-up: nothing blocks the event loop while the embedded server starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mission_runner.app import open_app
from mission_runner.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_starting_the_embedded_server_leaves_the_event_loop_running(
    tmp_path: Path,
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    settings = Settings(data_dir=tmp_path / "data", http_port=0)
    try:
        async with open_app(settings) as app:
            during = ticks
            assert app.embedded is not None
    finally:
        task.cancel()
    # initdb and the server's start take seconds; a blocking call would have let the ticker
    # run at most once meanwhile.
    assert during >= 20, during
