"""OpenTelemetry tracing, configured by the standard `OTEL_*` environment.

Tracing is on when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and not switched off (`OTEL_SDK_DISABLED=true`,
`OTEL_TRACES_EXPORTER=none`). The protocol follows `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` /
`OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `grpc`); the exporter reads the
rest of its environment (headers, timeouts, certificates) itself. With no endpoint, no SDK is
installed: the API's no-op tracer costs next to nothing.

Spans: `ingest.batch` (one group commit: LSN range, transactions, rows), `mission.dispatch`
(gates, planner rounds, write-back; linked to the batch that made the mission due), the planner's
HTTP calls, and the database calls around them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opentelemetry import trace

from mission_runner.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Tracing:
    """The installed provider (None: tracing is off), flushed and shut down at exit."""

    provider: object | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # type: ignore[attr-defined]


def setup_tracing(settings: Settings) -> Tracing:
    if not settings.otel_enabled:
        return Tracing()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if settings.otel_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    resource = Resource.create({"service.name": settings.otel_service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: OTLP over %s", settings.otel_protocol)
    return Tracing(provider)


class TraceIdFilter(logging.Filter):
    """Adds the current trace id to log records (the `trace_id` key of JSON logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace_id = format(ctx.trace_id, "032x")
        return True
