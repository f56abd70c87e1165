"""Wires health into a node: objects at build time, tasks and ports for the lifespan.

`install(app, settings)` runs in create_app (no I/O): the Lifecycle, the
in-flight counter and the drain controller (held on the app, reached through
service.node), the probe routes, and the admin routes when a token is set.
`running(app, database)` runs in the lifespan: the first round of checks,
then the background checker, the drain file watcher and the agent port, all
stopped within bounds when the node stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI

from service import node
from service.config import Settings
from service.db.engines import Database, create_engine
from service.health import admin, router
from service.health.agent import AgentServer
from service.health.checks import HealthChecker
from service.health.drain import DrainController, DrainFileWatcher
from service.health.inflight import InFlight, InFlightMiddleware
from service.health.lifecycle import Lifecycle, State
from service.telemetry.exporting import ExportStatus

log = logging.getLogger("service.health")


def install(app: FastAPI, settings: Settings) -> None:
    lifecycle = Lifecycle()
    in_flight = InFlight()
    node.hold(app, lifecycle=lifecycle, in_flight=in_flight, drain=DrainController(lifecycle))
    app.include_router(router.router)
    if settings.admin_token is not None:
        app.include_router(admin.router)
    app.add_middleware(InFlightMiddleware, counter=in_flight)


def leaving(app: FastAPI) -> Callable[[], bool]:
    """The edge middleware's `close_connections`: True from DRAINING on."""
    lifecycle = node.lifecycle(app)
    return lambda: lifecycle.leaving


@contextlib.asynccontextmanager
async def running(app: FastAPI, database: Database) -> AsyncIterator[HealthChecker]:
    settings = node.settings(app)
    lifecycle = node.lifecycle(app)
    drain = node.drain(app)
    # The checker's own pool of one, with its timeouts: see HealthChecker.check_primary.
    health_settings = settings.model_copy(
        update={
            "db_pool_size": 1,
            "db_pool_timeout_s": settings.health_timeout_s,
            "db_statement_timeout_s": settings.health_timeout_s,
        }
    )
    engine = create_engine(database.url, health_settings, role="health")
    checker = HealthChecker(
        settings,
        lifecycle=lifecycle,
        in_flight=node.in_flight(app),
        primary=engine,
        replicas=database.replicas,
        telemetry_status=_telemetry_status(app),
        pool=database.pool_watch,
    )
    watcher = DrainFileWatcher(settings.drain_file, drain) if settings.drain_file else None
    agent = AgentServer(lifecycle, checker) if settings.agent_port else None
    bound_s = settings.close_timeout_s
    try:
        await checker.start()
        drain.serving_state = checker.target_state
        if watcher is not None:
            watcher.start()
        if agent is not None:
            await agent.start(settings.host, settings.agent_port)
            # The agent port closes with the HTTP listener, not after the
            # in-flight requests: from then on HAProxy must use its HTTP check.
            lifecycle.subscribe(lambda _old, new: agent.close() if new is State.stopping else None)
        if lifecycle.state is State.starting:
            lifecycle.move(checker.target_state())
        yield checker
    finally:
        # Reached at shutdown (or a failed start): whatever got here is leaving.
        lifecycle.move(State.stopping)
        if agent is not None:
            await agent.wait_closed(bound_s)
        if watcher is not None:
            await watcher.stop(bound_s)
        await checker.stop(bound_s)
        await close_within(engine.dispose(), bound_s, "the health check pool")


async def close_within(closing: Awaitable[None], timeout_s: float, what: str) -> None:
    """Await a close, but never longer than `timeout_s`: a stuck close must not
    hold the process past its grace period (the orchestrator would SIGKILL it)."""
    try:
        await asyncio.wait_for(closing, timeout_s)
    except TimeoutError:
        log.warning("closing %s took longer than %.1f s; moving on", what, timeout_s)
    except Exception:
        log.warning("closing %s failed", what, exc_info=True)


def _telemetry_status(app: FastAPI) -> Callable[[], ExportStatus] | None:
    telemetry = node.telemetry(app)
    return None if telemetry is None else telemetry.export_status
