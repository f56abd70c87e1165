"""The bus settings refuse what cannot work, saying what to write instead."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_peers_are_split_and_checked() -> None:
    settings = Settings(bus_peers="tcp://10.0.0.1:7400, dns://cattle-bus:7400,tcp://[::1]:7400")
    assert settings.bus_peers == [
        "tcp://10.0.0.1:7400",
        "dns://cattle-bus:7400",
        "tcp://[::1]:7400",
    ]
    with pytest.raises(ValidationError, match="tcp://host:port or dns://name:port"):
        Settings(bus_peers="10.0.0.1:7400")
    with pytest.raises(ValidationError, match="tcp://host:port or dns://name:port"):
        Settings(bus_peers="dns://cattle-bus")


def test_the_bind_address_is_checked() -> None:
    assert Settings(bus_bind="tcp://0.0.0.0:7400").bus_bind == "tcp://0.0.0.0:7400"
    with pytest.raises(ValidationError, match="port \\* for any free port"):
        Settings(bus_bind="0.0.0.0:7400")


def test_timings_that_would_flap_are_refused() -> None:
    with pytest.raises(ValidationError, match="CATTLE_BUS_DEAD_AFTER_S must exceed"):
        Settings(bus_suspect_after_s=5, bus_dead_after_s=5)
    with pytest.raises(ValidationError, match="at least twice"):
        Settings(bus_heartbeat_interval_s=2, bus_suspect_after_s=3)
