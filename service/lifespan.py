"""What a node holds for its lifetime, opened at start and closed at stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from service import domains, node
from service.bus import runtime as bus_runtime
from service.bus.bus import Bus
from service.cache import runtime as cache_runtime
from service.cache.store import ReadCache
from service.config import Environment, Settings
from service.db import migrate
from service.db.engines import Database
from service.health import runtime as health
from service.health.lifecycle import State
from service.idempotency import service as idempotency
from service.tasks import cancel_within

log = logging.getLogger("service.lifespan")


class SchemaNotCurrent(RuntimeError):
    pass


async def ensure_schema(settings: Settings, database: Database) -> None:
    """Production nodes refuse an unmigrated schema; development migrates it.

    Migrating at every node start lets N replicas race on the schema, so in
    production the migration is one explicit step (`python -m service migrate`).
    """
    schema = domains.schema()
    state = await migrate.schema_state(database.writer, schema)
    if state.is_current:
        return
    if settings.environment is Environment.production:
        raise SchemaNotCurrent(
            f"database schema is at {state.current or 'nothing (empty database)'}, "
            f"this build needs {state.head}; run `python -m service migrate` first"
        )
    log.info("development mode: migrating %s to %s", state.current, state.head)
    await migrate.migrate(database.url, schema)


async def _purge_idempotency_keys(database: Database, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            purged = await idempotency.purge_expired(database)
        except Exception:  # the next round tries again; serving goes on
            log.warning("purging expired idempotency keys failed", exc_info=True)
        else:
            if purged:
                log.info("purged %d expired idempotency keys", purged)


def connect_cache(bus: Bus, cache: ReadCache) -> None:
    """The cache hears the peers' writes and tells them of this node's, and
    heartbeats carry its counters. Neither package knows the other."""
    bus.subscribe_invalidations(cache)
    bus.set_stats_provider(cache.stats)
    cache.publish = bus.publish_invalidations


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    settings = node.settings(app)
    telemetry = node.telemetry(app)
    if telemetry is None:
        raise RuntimeError("the app has no telemetry: build it with service.app.create_app")
    # First in, last out: exporters see the whole life of the node.
    telemetry.start()
    database = Database(settings)
    telemetry.instrument_database(database)
    cache = cache_runtime.build(app)  # None with CATTLE_CACHE=off
    try:
        await ensure_schema(settings, database)
        background = [
            asyncio.create_task(
                _purge_idempotency_keys(database, settings.idempotency_purge_interval_s),
                name="idempotency-purge",
            )
        ]
        if database.replicas.replicas:
            # Know every replica's lag before the first read is routed.
            await database.replicas.check()
            background.append(
                asyncio.create_task(
                    database.replicas.run(settings.replica_check_interval_s),
                    name="replica-monitor",
                )
            )
        try:
            # The bus first: the move to READY is announced to the peers, and
            # its `bye` goes out after the last request's invalidations.
            async with (
                bus_runtime.running(app) as bus,
                health.running(app, database) as checker,
            ):
                if bus is not None and cache is not None:
                    connect_cache(bus, cache)
                yield node.started(database=database, health=checker, bus=bus, cache=cache)
        finally:
            for task in background:
                await cancel_within(task, settings.close_timeout_s)
    finally:
        await health.close_within(database.dispose(), settings.close_timeout_s, "database pools")
        node.lifecycle(app).move(State.stopped)
        await telemetry.shutdown()  # bounded by CATTLE_TELEMETRY_SHUTDOWN_TIMEOUT_S
