"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from mission_runner.settings import Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.database_url is None
    assert s.data_dir == Path(".mission-runner")
    assert s.slot == "mission_runner"
    assert s.publication == "mission_runner"
    assert s.status_interval == 10.0
    assert s.batch_max_transactions >= 1


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10", 10.0), ("500ms", 0.5), ("2m", 120.0), ("1.5s", 1.5), ("1h", 3600.0)],
)
def test_durations(value: str, seconds: float) -> None:
    assert Settings.from_env({"MISSION_RUNNER_STATUS_INTERVAL": value}).status_interval == seconds


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MISSION_RUNNER_SLOT", "Bad-Name"),
        ("MISSION_RUNNER_PUBLICATION", "x" * 64),
        ("MISSION_RUNNER_STATUS_INTERVAL", "soon"),
        ("MISSION_RUNNER_STATUS_INTERVAL", "0"),
        ("MISSION_RUNNER_BATCH_MAX_ROWS", "0"),
        ("MISSION_RUNNER_BATCH_MAX_ROWS", "many"),
        ("MISSION_RUNNER_STREAMING", "perhaps"),
        ("MISSION_RUNNER_PURE_PYTHON", "sometimes"),
        ("LOG_FORMAT", "xml"),
        ("DATABASE_URL", "not a dsn"),
    ],
)
def test_wrong_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({name: value})
    assert info.value.setting == name
    assert name in str(info.value)


def test_backoff_bounds_are_consistent() -> None:
    with pytest.raises(ConfigurationError, match="MISSION_RUNNER_RECONNECT_MAX_BACKOFF"):
        Settings.from_env(
            {
                "MISSION_RUNNER_RECONNECT_MIN_BACKOFF": "10s",
                "MISSION_RUNNER_RECONNECT_MAX_BACKOFF": "1s",
            }
        )


def test_cli_exits_2_with_a_message_naming_the_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mission_runner.cli", "status"],
        env={"MISSION_RUNNER_SLOT": "No Good", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "MISSION_RUNNER_SLOT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_rejects_unknown_failpoint() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mission_runner.cli", "status"],
        env={"MISSION_RUNNER_FAILPOINTS": "nowhere", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "MISSION_RUNNER_FAILPOINTS" in proc.stderr


def test_tracing_is_off_without_an_endpoint_and_follows_the_otel_environment() -> None:
    from opentelemetry import trace

    from mission_runner.tracing import setup_tracing

    off = Settings.from_env({})
    assert not off.otel_enabled
    tracing = setup_tracing(off)
    assert not tracing.enabled
    span = trace.get_tracer("t").start_span("x")
    assert not span.is_recording()  # the API's no-op: no SDK installed
    on = Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert on.otel_enabled and on.otel_protocol == "http/protobuf"
    grpc = Settings.from_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
    )
    assert grpc.otel_enabled and grpc.otel_protocol == "grpc"
    assert not Settings.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    ).otel_enabled
    assert not Settings.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}
    ).otel_enabled
    with pytest.raises(ConfigurationError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        Settings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})
