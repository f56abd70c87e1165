"""The node's shared objects, reached one way: typed accessors over app and request state.

Two lifetimes, two places. What create_app builds without I/O (settings,
lifecycle, in-flight counter, drain controller, telemetry) hangs on the app's
state; what the lifespan opens (the database, the health checker) travels in
the lifespan state Starlette copies into every request. Routes, dependencies,
middleware and the server ask here instead of reading either by attribute
name, so each name is spelt once and every caller gets a typed object.

The types are imported for the type checker only: this module sits below
every package whose objects it hands out (health's routes use it too), so a
runtime import of them would be a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from service.bus import Bus
    from service.cache import ReadCache
    from service.config import Settings
    from service.db.engines import Database
    from service.health.checks import HealthChecker
    from service.health.drain import DrainController
    from service.health.inflight import InFlight
    from service.health.lifecycle import Lifecycle
    from service.telemetry import Telemetry


def _held(app: Starlette, name: str) -> Any:
    try:
        return getattr(app.state, name)
    except AttributeError:
        raise RuntimeError(
            f"the app holds no {name}: build it with service.app.create_app"
        ) from None


# Built by create_app, on the app.


def settings(app: Starlette) -> Settings:
    return cast("Settings", _held(app, "settings"))


def lifecycle(app: Starlette) -> Lifecycle:
    return cast("Lifecycle", _held(app, "lifecycle"))


def in_flight(app: Starlette) -> InFlight:
    return cast("InFlight", _held(app, "in_flight"))


def drain(app: Starlette) -> DrainController:
    return cast("DrainController", _held(app, "drain"))


def telemetry(app: Starlette) -> Telemetry | None:
    """None on an app built without telemetry installed (some tests do)."""
    return cast("Telemetry | None", getattr(app.state, "telemetry", None))


def hold(
    app: Starlette,
    *,
    settings: Settings | None = None,
    lifecycle: Lifecycle | None = None,
    in_flight: InFlight | None = None,
    drain: DrainController | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Put build-time objects on the app; each installer passes the ones it makes."""
    given = {
        "settings": settings,
        "lifecycle": lifecycle,
        "in_flight": in_flight,
        "drain": drain,
        "telemetry": telemetry,
    }
    for name, value in given.items():
        if value is not None:
            setattr(app.state, name, value)


# Opened by the lifespan, on each request.


def started(
    *,
    database: Database,
    health: HealthChecker,
    bus: Bus | None = None,
    cache: ReadCache | None = None,
) -> dict[str, Any]:
    """The lifespan state to yield: what requests of a started node can reach."""
    return {"database": database, "health": health, "bus": bus, "cache": cache}


def database(connection: HTTPConnection) -> Database:
    try:
        return cast("Database", connection.state.database)
    except AttributeError:
        raise RuntimeError("no database: the node's lifespan has not started") from None


def health(connection: HTTPConnection) -> HealthChecker | None:
    """None before the lifespan started the checker (an app served without lifespan)."""
    return cast("HealthChecker | None", getattr(connection.state, "health", None))


def bus(connection: HTTPConnection) -> Bus | None:
    """None with CATTLE_BUS=off, or before the lifespan started it."""
    return cast("Bus | None", getattr(connection.state, "bus", None))


def cache(connection: HTTPConnection) -> ReadCache | None:
    """None with CATTLE_CACHE=off, or before the lifespan built it."""
    return cast("ReadCache | None", getattr(connection.state, "cache", None))
