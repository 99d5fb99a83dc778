"""The HTTP surface: health, readiness, Prometheus metrics, the status API and page.

- `/healthz`: the process is alive (the event loop answers).
- `/readyz`: 200 only while this instance holds the replication stream and its lag is under
  `MISSION_RUNNER_READY_MAX_LAG`; a waiting second instance answers 503.
- `/metrics`: Prometheus text from the injected registry.
- `/api/status`: JSON for people and scripts; `/`: a page that draws it (no build, no CDN).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.clock import Clock
from core.errors import ConfigurationError
from core.instants import format_stamp
from mission_runner.ingest import Ingestor
from mission_runner.metrics import Metrics
from mission_runner.missions import MissionRuntime
from mission_runner.monitor import LagMonitor
from mission_runner.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StatusApp:
    def __init__(
        self,
        *,
        settings: Settings,
        ingestor: Ingestor,
        runtime: MissionRuntime | None,
        monitor: LagMonitor,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.runtime = runtime
        self.monitor = monitor
        self.metrics = metrics
        self.clock = clock
        self.started_us = clock.now_us()
        self.port: int | None = None
        self._page = resources.files("mission_runner").joinpath("static/status.html").read_bytes()

    # -- readiness ----------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        ing = self.ingestor
        if not ing.streaming.is_set():
            return False, f"not streaming ({ing.phase})"
        lag = self.monitor.lag_seconds()
        if lag > self.settings.ready_max_lag:
            return False, f"lag {lag:.1f} s exceeds {self.settings.ready_max_lag:g} s"
        return True, "streaming"

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        ing = self.ingestor
        now = self.clock.now_us()
        ready, why = self.ready()
        sample = self.monitor.last
        lag = sample.lag if sample is not None else None
        repl = ing.replication
        history = list(self.monitor.history)
        throughput = {"rows_per_second": 0.0, "transactions_per_second": 0.0}
        if len(history) >= 2:
            (t0, _b0, _s0, r0, x0), (t1, _b1, _s1, r1, x1) = (
                history[-min(len(history), 13)],
                history[-1],
            )
            span = max(1e-6, (t1 - t0) / 1_000_000)
            throughput = {
                "rows_per_second": (r1 - r0) / span,
                "transactions_per_second": (x1 - x0) / span,
            }
        out: dict[str, Any] = {
            "now": format_stamp(now),
            "started": format_stamp(self.started_us),
            "instance": {
                "phase": str(ing.phase),
                "streaming": ing.streaming.is_set(),
                "ready": ready,
                "ready_reason": why,
                "last_error": ing.last_error,
                "planner": self.runtime.planner.name if self.runtime else None,
            },
            "slot": {
                "name": self.settings.slot,
                "wal_status": lag.wal_status if lag else None,
                "lag_bytes": lag.lag_bytes if lag else None,
                "lag_seconds": self.monitor.lag_seconds(),
                "retained_wal_bytes": lag.retained_bytes if lag else None,
                "safe_wal_bytes": lag.safe_wal_size if lag else None,
                "confirmed_flush_lsn": str(lag.confirmed_flush_lsn)
                if lag and lag.confirmed_flush_lsn
                else None,
                "current_wal_lsn": str(lag.current_lsn) if lag else None,
                "received_lsn": str(repl.stats.received_lsn) if repl else None,
            },
            "checkpoint": {
                "lsn": str(ing.persisted_lsn),
                "applied_lsn": str(ing.projector.applied_lsn),
            },
            "throughput": throughput,
            "totals": {"transactions": ing.transactions_applied, "rows": ing.rows_applied},
            "snapshots": {
                "missions": ing.missions.live_count(),
                "agents": ing.agents.live_count(),
            },
            "history": [
                {"t": t, "lag_bytes": b, "lag_seconds": s, "rows": r, "transactions": x}
                for t, b, s, r, x in history
            ],
        }
        if self.runtime is not None:
            rt = self.runtime
            out["due_queue"] = {
                "size": len(rt.scheduler.index),
                "due_now": rt.scheduler.index.due_count(now),
                "upcoming": [
                    {
                        "user_id": o.user_id,
                        "mission_id": o.mission_id,
                        "next_run_at": format_stamp(o.at_us),
                        "due_at": format_stamp(when),
                    }
                    for when, o in rt.scheduler.index.upcoming(20)
                ],
            }
            out["in_flight"] = rt.in_flight
            out["recent_dispatches"] = [
                {
                    "user_id": r.user_id,
                    "mission_id": r.mission_id,
                    "agent_id": r.agent_id,
                    "occurrence": format_stamp(r.occurrence_us),
                    "outcome": r.outcome,
                    "steps": r.steps,
                    "error": r.error,
                    "started": format_stamp(r.started_us),
                    "seconds": max(0.0, (r.finished_us - r.started_us) / 1_000_000),
                }
                for r in rt.recent
            ]
            out["recent_errors"] = [d for d in out["recent_dispatches"] if d["error"]]
        return out

    # -- handlers -----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, why = self.ready()
        return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    @web.middleware
    async def _measure(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            route = request.match_info.route.resource
            path = route.canonical if route is not None else "other"
            self.metrics.http_requests.labels(request.method, path, str(status)).inc()
            self.metrics.http_duration.labels(path).observe(time.perf_counter() - started)

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._measure])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/", self.page)
        return app


async def serve(status_app: StatusApp, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(status_app.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigurationError(
            "HTTP_PORT", f"cannot listen on {host}:{port} ({exc.strerror}); choose a free port"
        ) from None
    status_app.port = int(runner.addresses[0][1]) if runner.addresses else port
    log.info("HTTP on http://%s:%d (status page /, metrics /metrics)", host, status_app.port)
    return runner
