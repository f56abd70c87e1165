"""Health, drain and agent settings fail fast on unsafe or inconsistent values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.config import Settings

PRODUCTION: dict[str, Any] = {
    "environment": "production",
    "cursor_secret": "a-production-cursor-secret-0123",
}


def test_defaults_turn_the_extras_off() -> None:
    settings = Settings()
    assert settings.agent_port == 0
    assert settings.drain_file is None
    assert settings.admin_token is None
    assert settings.drain_delay_s == 5
    assert settings.shutdown_timeout_s == 20


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATTLE_ADMIN_TOKEN", "")
    monkeypatch.setenv("CATTLE_DRAIN_FILE", " ")
    settings = Settings()
    assert settings.admin_token is None
    assert settings.drain_file is None


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATTLE_AGENT_PORT", "9777")
    monkeypatch.setenv("CATTLE_DRAIN_FILE", "/run/cattle/drain")
    monkeypatch.setenv("CATTLE_DRAIN_DELAY_S", "12.5")
    settings = Settings()
    assert settings.agent_port == 9777
    assert settings.drain_file == Path("/run/cattle/drain")
    assert settings.drain_delay_s == 12.5


def test_production_refuses_a_short_admin_token() -> None:
    with pytest.raises(ValidationError, match="CATTLE_ADMIN_TOKEN must be at least 16"):
        Settings(**PRODUCTION, admin_token="short")
    assert Settings(**PRODUCTION, admin_token="x" * 16).admin_token is not None
    # Development accepts a short one: it is a workshop laptop.
    assert Settings(admin_token="dev").admin_token is not None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"admin_token": "has a space in it 0123"}, "whitespace"),
        ({"agent_port": 8000, "port": 8000}, "must differ"),
        ({"health_interval_s": 0.1, "health_timeout_s": 5}, "HEALTH_TIMEOUT_S"),
        ({"drain_delay_s": -1}, "greater than or equal"),
        ({"shutdown_timeout_s": 0}, "greater than"),
        ({"max_in_flight": 0}, "greater than or equal"),
    ],
)
def test_inconsistent_values_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)
