"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mission_runner.errors import ConfigurationError
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
