"""The HTTP surface: health, readiness, Prometheus metrics, the status API and page.

- `/healthz`: the process is alive (the event loop answers).
- `/readyz`: 200 only while this instance leads and holds the replication stream, its lag
  (`stream.lag`) is under `MISSION_RUNNER_READY_MAX_LAG`, and the stream moves while the
  server's WAL grows; a waiting second instance, or one riding out a database outage,
  answers 503 with the reason.
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
from core.instants import iso_ms
from mission_runner.metrics import Metrics
from mission_runner.settings import Settings
from planner.runtime import MissionRuntime
from stream.monitor import LagMonitor
from stream.supervisor import Supervisor

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Json = dict[str, Any]


class StatusApp:
    def __init__(
        self,
        *,
        settings: Settings,
        supervisor: Supervisor,
        runtime: MissionRuntime | None,
        monitor: LagMonitor,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.runtime = runtime
        self.monitor = monitor
        self.metrics = metrics
        self.clock = clock
        self.started_us = clock.now_us()
        self.port: int | None = None
        self._page = resources.files("mission_runner").joinpath("static/status.html").read_bytes()

    def ready(self) -> tuple[bool, str]:
        return self.monitor.ready(self.settings.ready_max_lag)

    # -- status, by section -----------------------------------------------------------------

    def status(self) -> Json:
        now = self.clock.now_us()
        out: Json = {
            "now": iso_ms(now),
            "started": iso_ms(self.started_us),
            "instance": self._instance(),
            "slot": self._slot(),
            "checkpoint": self._checkpoint(),
            "throughput": self._throughput(),
            "totals": {
                "transactions": self.supervisor.ingest.transactions_applied,
                "rows": self.supervisor.ingest.rows_applied,
            },
            "snapshots": {
                "missions": self.supervisor.ingest.missions.live_count(),
                "agents": self.supervisor.ingest.agents.live_count(),
            },
            "history": [
                {
                    "t": p.at_us,
                    "lag_bytes": p.lag_bytes,
                    "lag_seconds": p.lag_seconds,
                    "rows": p.rows,
                    "transactions": p.transactions,
                }
                for p in self.monitor.history
            ],
        }
        if self.runtime is not None:
            out.update(self._runtime(self.runtime, now))
        return out

    def _instance(self) -> Json:
        sup = self.supervisor
        ready, why = self.ready()
        term = sup.term
        return {
            "phase": str(sup.phase),
            "streaming": sup.streaming.is_set(),
            "leader": term is not None,
            "epoch": term.epoch if term is not None else None,
            "waiting_on": sup.lock.waiting_on,
            "ready": ready,
            "ready_reason": why,
            "last_error": sup.last_error,
            "planner": self.runtime.planner_name if self.runtime else None,
        }

    def _slot(self) -> Json:
        lag = self.monitor.last
        repl = self.supervisor.replication
        return {
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
        }

    def _checkpoint(self) -> Json:
        ingest = self.supervisor.ingest
        return {"lsn": str(ingest.persisted_lsn), "applied_lsn": str(ingest.applied_lsn)}

    def _throughput(self) -> Json:
        history = list(self.monitor.history)
        if len(history) < 2:
            return {"rows_per_second": 0.0, "transactions_per_second": 0.0}
        first, last = history[-min(len(history), 13)], history[-1]
        span = max(1e-6, (last.at_us - first.at_us) / 1_000_000)
        return {
            "rows_per_second": (last.rows - first.rows) / span,
            "transactions_per_second": (last.transactions - first.transactions) / span,
        }

    def _runtime(self, rt: MissionRuntime, now: int) -> Json:
        dispatches = [
            {
                "user_id": r.user_id,
                "mission_id": r.mission_id,
                "agent_id": r.agent_id,
                "occurrence": iso_ms(r.occurrence_us),
                "outcome": r.outcome,
                "steps": r.steps,
                "error": r.error,
                "started": iso_ms(r.started_us),
                "seconds": max(0.0, (r.finished_us - r.started_us) / 1_000_000),
            }
            for r in rt.recent
        ]
        return {
            "due_queue": {
                "size": len(rt.scheduler.index),
                "due_now": rt.scheduler.index.due_count(now),
                "upcoming": [
                    {
                        "user_id": o.user_id,
                        "mission_id": o.mission_id,
                        "next_run_at": iso_ms(o.at_us),
                        "due_at": iso_ms(when),
                    }
                    for when, o in rt.scheduler.index.upcoming(20)
                ],
            },
            "in_flight": rt.in_flight,
            "recent_dispatches": dispatches,
            "recent_errors": [d for d in dispatches if d["error"]],
        }

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
            self.metrics.http.requests.labels(request.method, path, str(status)).inc()
            self.metrics.http.duration.labels(path).observe(time.perf_counter() - started)

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
