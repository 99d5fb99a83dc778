"""The status page in a real headless Chromium: it loads, fetches the status API and shows it."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from importlib import resources

import pytest

from tests.fix_data import agent, awrite, iteration_rows, mission
from tests.fix_pg import TestDatabase
from tests.fix_service import eventually, running_full_service

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: str | None = None) -> str:
    """The page's DOM after its scripts ran (virtual time lets the first refresh finish)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="chromium") as profile:
        args = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "--virtual-time-budget=5000",
        ]
        if screenshot:
            subprocess.run(
                [*args, f"--screenshot={screenshot}", url],
                check=True,
                capture_output=True,
                timeout=60,
            )
        done = subprocess.run(
            [*args, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=60
        )
    return done.stdout


def test_the_page_needs_nothing_from_the_network() -> None:
    page = resources.files("mission_runner").joinpath("static/status.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "import " not in page and "@import" not in page


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (make test installs it when run as root)",
)
async def test_status_page_in_headless_chromium(db: TestDatabase) -> None:
    from tests.fix_data import write

    write(db, agent("a1"))
    async with running_full_service(db) as svc:
        await awrite(db, mission("m-due"), mission("m-later", next_run_at="2099-01-01T00:00:00Z"))
        await eventually(lambda: len(iteration_rows(db)) == 1, what="the dispatch")
        await svc.supervisor.sync_point()
        for _ in range(3):
            await svc.app.monitor.sample()
            await asyncio.sleep(0.05)
        port = svc.app.status.port
        dom = await asyncio.to_thread(
            render, f"http://127.0.0.1:{port}/", "/tmp/mission-runner-status.png"
        )
    assert '<span id="state" class="pill ok">ready</span>' in dom
    assert "planner: offline" in dom
    assert re.search(r'id="dueSize">1<', dom)  # m-later is scheduled
    assert "m-later" in dom and "2099-01-01T00:00:00.000Z" in dom
    row = re.search(r"<tr><td>[^<]+</td><td>m-due</td><td>a1</td>.*?</tr>", dom)
    assert row is not None and "<td>written</td>" in row.group(0)
    assert re.search(r'<path d="M[0-9.]+,[0-9.]+', dom)  # the lag chart has a line
    assert re.search(r'id="lagSeconds">0 s<', dom)
    assert "wal_status</span><span>reserved" in dom
