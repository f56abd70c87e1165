"""Wires the bus into a node's lifespan: built from the settings, fed by the
lifecycle and the in-flight counter, closed within the close bound."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI

import service
from service import node
from service.bus.bus import Bus, BusRefused

log = logging.getLogger("service.bus")


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[Bus | None]:
    """The started bus, or None with CATTLE_BUS=off."""
    settings = node.settings(app)
    if not settings.bus:
        yield None
        return
    lifecycle = node.lifecycle(app)
    telemetry = node.telemetry(app)
    bus = Bus(
        settings,
        status=_status(app),
        meter=None
        if telemetry is None or telemetry.meter_provider is None
        else telemetry.meter_provider.get_meter(service.NAME),
        tracer_provider=None if telemetry is None else telemetry.tracer_provider,
    )
    try:
        await bus.start()
    except BusRefused as exc:
        log.error("refusing to start: %s", exc)
        raise
    # Every lifecycle change is on the peers' (and the lab's watch) view at once.
    lifecycle.subscribe(lambda _old, _new: bus.announce())
    try:
        yield bus
    finally:
        await bus.close(settings.close_timeout_s)


def _status(app: FastAPI) -> Callable[[], Mapping[str, Any]]:
    """A heartbeat's node fields: lifecycle state, in-flight requests, requests per second."""
    lifecycle = node.lifecycle(app)
    in_flight = node.in_flight(app)
    last = [time.monotonic(), in_flight.total]

    def status() -> Mapping[str, Any]:
        now, total = time.monotonic(), in_flight.total
        elapsed = now - last[0]
        rps = (total - last[1]) / elapsed if elapsed > 0 else 0.0
        last[:] = [now, total]
        return {
            "state": str(lifecycle.state),
            "in_flight": in_flight.count,
            "rps": round(rps, 1),
        }

    return status
