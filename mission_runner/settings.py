"""Settings: built once from the environment, in one place.

Nothing else in the code base reads `os.environ`. A wrong value raises ConfigurationError
naming the variable; the CLI turns that into a message and exit code 2.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigurationError

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _duration(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    match = _DURATION.match(raw)
    if match is None:
        raise ConfigurationError(
            name, f"{raw!r} is not a duration; use seconds (e.g. 10) or a unit: 500ms, 10s, 5m, 1h"
        )
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < minimum:
        raise ConfigurationError(name, f"{raw!r} is below the minimum of {minimum:g} s")
    return value


def _int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigurationError(name, f"{raw!r} is not a whole number") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise ConfigurationError(name, f"{value} must be at least {minimum}{upper}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(name, f"{raw!r} is not a boolean; use true or false")


def _ident(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip()
    if not _IDENT.match(value):
        raise ConfigurationError(
            name,
            f"{value!r} is not a valid name: use 1-63 lower-case letters, digits and "
            "underscores, starting with a letter or underscore",
        )
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigurationError(name, f"{raw!r} is not one of: {', '.join(choices)}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. Durations are in seconds."""

    database_url: str | None = None
    data_dir: Path = Path(".mission-runner")
    slot: str = "mission_runner"
    publication: str = "mission_runner"
    # Replication stream
    status_interval: float = 10.0
    heartbeat_interval: float = 30.0
    streaming: bool = True
    # True: the frame reader and the projector are built without their compiled helpers
    # (`StreamOptions.compiled` and `Projector(compiled=...)` False).
    pure_python: bool = False
    connect_retry: float = 30.0
    reconnect_min_backoff: float = 0.5
    reconnect_max_backoff: float = 30.0
    # Group commit: persist after this many transactions / rows, or this long after the
    # first unpersisted one, whichever comes first.
    batch_max_transactions: int = 5000
    batch_max_rows: int = 50_000
    batch_max_delay: float = 0.2
    # Logs
    log_level: str = "info"
    log_format: str = "text"
    # Mission runtime
    planner_url: str | None = None
    planner_api_key: str | None = None
    planner_model: str = "mana/reasoning"
    planner_timeout: float = 120.0
    planner_max_attempts: int = 3
    planner_retry_base: float = 1.0
    tool_catalog: Path | None = None
    ledger_keep_days: int = 30
    shutdown_grace: float = 6.0
    # HTTP
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    ready_max_lag: float = 300.0
    # OpenTelemetry (the exporter reads the rest of the OTEL_* environment itself)
    otel_enabled: bool = False
    otel_protocol: str = "http/protobuf"
    otel_service_name: str = "mission-runner"
    # Crash testing only (see core/failpoints.py).
    failpoints: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        database_url = env.get("DATABASE_URL") or None
        if database_url is not None:
            _check_dsn(database_url)
        data_dir = Path(env.get("MISSION_RUNNER_DATA_DIR") or ".mission-runner")
        settings = cls(
            database_url=database_url,
            data_dir=data_dir,
            slot=_ident(env, "MISSION_RUNNER_SLOT", "mission_runner"),
            publication=_ident(env, "MISSION_RUNNER_PUBLICATION", "mission_runner"),
            status_interval=_duration(env, "MISSION_RUNNER_STATUS_INTERVAL", 10.0, minimum=0.1),
            heartbeat_interval=_duration(env, "MISSION_RUNNER_HEARTBEAT_INTERVAL", 30.0),
            streaming=_bool(env, "MISSION_RUNNER_STREAMING", True),
            pure_python=_bool(env, "MISSION_RUNNER_PURE_PYTHON", False),
            connect_retry=_duration(env, "MISSION_RUNNER_CONNECT_RETRY", 30.0),
            reconnect_min_backoff=_duration(
                env, "MISSION_RUNNER_RECONNECT_MIN_BACKOFF", 0.5, minimum=0.01
            ),
            reconnect_max_backoff=_duration(
                env, "MISSION_RUNNER_RECONNECT_MAX_BACKOFF", 30.0, minimum=0.01
            ),
            batch_max_transactions=_int(
                env, "MISSION_RUNNER_BATCH_MAX_TRANSACTIONS", 5000, minimum=1
            ),
            batch_max_rows=_int(env, "MISSION_RUNNER_BATCH_MAX_ROWS", 50_000, minimum=1),
            batch_max_delay=_duration(env, "MISSION_RUNNER_BATCH_MAX_DELAY", 0.2),
            log_level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            log_format=_choice(env, "LOG_FORMAT", "text", ("text", "json")),
            failpoints=env.get("MISSION_RUNNER_FAILPOINTS") or None,
            planner_url=_url(env, "PLANNER_URL"),
            planner_api_key=env.get("PLANNER_API_KEY") or None,
            planner_model=(env.get("PLANNER_MODEL") or "mana/reasoning").strip(),
            planner_timeout=_duration(env, "PLANNER_TIMEOUT", 120.0, minimum=0.1),
            planner_max_attempts=_int(env, "PLANNER_MAX_ATTEMPTS", 3, minimum=1, maximum=20),
            planner_retry_base=_duration(env, "PLANNER_RETRY_BASE", 1.0, minimum=0.001),
            tool_catalog=_file(env, "PLANNER_TOOL_CATALOG"),
            ledger_keep_days=_int(env, "MISSION_RUNNER_LEDGER_KEEP_DAYS", 30, minimum=1),
            shutdown_grace=_duration(env, "MISSION_RUNNER_SHUTDOWN_GRACE", 6.0),
            http_host=(env.get("HTTP_HOST") or "127.0.0.1").strip(),
            http_port=_int(env, "HTTP_PORT", 8080, minimum=0, maximum=65535),
            ready_max_lag=_duration(env, "MISSION_RUNNER_READY_MAX_LAG", 300.0, minimum=1),
            otel_enabled=_otel_enabled(env),
            otel_protocol=_otel_protocol(env),
            otel_service_name=(env.get("OTEL_SERVICE_NAME") or "mission-runner").strip(),
        )
        if settings.reconnect_max_backoff < settings.reconnect_min_backoff:
            raise ConfigurationError(
                "MISSION_RUNNER_RECONNECT_MAX_BACKOFF",
                "must not be below MISSION_RUNNER_RECONNECT_MIN_BACKOFF",
            )
        if data_dir.exists() and not data_dir.is_dir():
            raise ConfigurationError("MISSION_RUNNER_DATA_DIR", f"{data_dir} is not a directory")
        return settings


def _url(env: Mapping[str, str], name: str) -> str | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if not re.match(r"^https?://[^/\s]+", raw):
        raise ConfigurationError(name, f"{raw!r} is not an http(s) URL, e.g. http://llm:8000")
    return raw.rstrip("/")


def _file(env: Mapping[str, str], name: str) -> Path | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigurationError(name, f"{raw!r} is not a readable file")
    return path


def _otel_enabled(env: Mapping[str, str]) -> bool:
    if _bool(env, "OTEL_SDK_DISABLED", False):
        return False
    exporter = (env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    if exporter == "none":
        return False
    if exporter != "otlp":
        raise ConfigurationError("OTEL_TRACES_EXPORTER", f"{exporter!r}: use otlp or none")
    return bool(
        (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip()
        or (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    )


def _otel_protocol(env: Mapping[str, str]) -> str:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = (env.get(name) or "").strip().lower()
        if raw:
            if raw not in {"grpc", "http/protobuf"}:
                raise ConfigurationError(name, f"{raw!r}: use grpc or http/protobuf")
            return raw
    return "http/protobuf"


def _check_dsn(dsn: str) -> None:
    from psycopg import conninfo

    try:
        conninfo.conninfo_to_dict(dsn)
    except Exception as exc:
        raise ConfigurationError(
            "DATABASE_URL",
            f"not a valid PostgreSQL connection string ({exc}); "
            "use e.g. postgresql://user:password@host:5432/dbname",
        ) from None
