"""OpenTelemetry: spans and links reach a real local OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.fix_data import agent, awrite, mission, write
from tests.fix_llm import Call, FakeLLM, Reply
from tests.fix_pg import TestDatabase
from tests.fix_service import ServiceProcess, eventually

pytestmark = pytest.mark.integration


@dataclass
class OtlpReceiver:
    url: str = ""
    spans: list[Span] = field(default_factory=list)
    services: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest()
        body.ParseFromString(await request.read())
        for resource_spans in body.resource_spans:
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.name":
                    self.services.add(attr.value.string_value)
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield receiver
    await runner.cleanup()


def attrs(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


async def test_spans_and_links_reach_an_otlp_receiver(
    db: TestDatabase,
    fake_llm: FakeLLM,
    otlp: OtlpReceiver,
    service_processes: list[ServiceProcess],
) -> None:
    fake_llm.script(Reply(tool_calls=[Call("create_task", {"title": "x"})]), Reply("done"))
    write(db, agent("a1"))
    svc = ServiceProcess(
        db,
        PLANNER_URL=fake_llm.url,
        HTTP_PORT="0",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_SERVICE_NAME="mission-runner-test",
        OTEL_BSP_SCHEDULE_DELAY="100",
    ).start()
    service_processes.append(svc)
    await asyncio.to_thread(svc.wait_streaming)
    await awrite(db, mission("m1"))
    await eventually(
        lambda: bool(otlp.named("mission.dispatch")), within=30, what="the dispatch span"
    )
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(svc.proc.wait, 15) == 0, svc.output()

    assert otlp.services == {"mission-runner-test"}
    (dispatch,) = otlp.named("mission.dispatch")
    a = attrs(dispatch)
    assert a["mission_runner.mission_id"] == "m1"
    assert a["mission_runner.gate.decision"] == "ran"
    assert a["mission_runner.outcome"] == "written"
    batches = {s.span_id: s for s in otlp.named("ingest.batch")}
    assert batches, [s.name for s in otlp.spans]
    # The dispatch links to the ingest batch that made the mission due.
    assert dispatch.links and dispatch.links[0].span_id in batches
    made_due = batches[dispatch.links[0].span_id]
    b = attrs(made_due)
    assert b["mission_runner.transactions"] >= 1 and b["mission_runner.rows"] >= 1
    assert "mission_runner.lsn.first" in b and "mission_runner.lsn.last" in b
    # Children of the dispatch: the planner (with its HTTP calls) and the database calls.
    in_trace = [s for s in otlp.spans if s.trace_id == dispatch.trace_id]
    names = {s.name for s in in_trace}
    assert {
        "planner.plan",
        "POST /v1/chat/completions",
        "db.ledger.claim",
        "db.iteration.write_back",
    } <= names
    http_calls = [s for s in in_trace if s.name == "POST /v1/chat/completions"]
    assert len(http_calls) == 2  # two planner rounds
    assert all(attrs(s)["http.response.status_code"] == 200 for s in http_calls)
    assert otlp.named("db.persist")
