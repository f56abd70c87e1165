"""Builds a node's read cache from the settings and exposes its counters as metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import FastAPI
from opentelemetry.metrics import CallbackOptions, Meter, Observation

import service
from service import node
from service.cache.store import ReadCache
from service.config import Settings


def build(app: FastAPI) -> ReadCache | None:
    """The node's cache, or None with CATTLE_CACHE=off."""
    settings = node.settings(app)
    if not settings.cache:
        return None
    cache = ReadCache(
        max_entries=settings.cache_max_entries,
        ttl_s=settings.cache_ttl_s,
        tombstone_keep_s=tombstone_keep_s(settings),
    )
    telemetry = node.telemetry(app)
    if telemetry is not None and telemetry.meter_provider is not None:
        instrument(cache, telemetry.meter_provider.get_meter(service.NAME))
    return cache


def tombstone_keep_s(settings: Settings) -> float:
    """How long an invalidation keeps refusing older fills of its key.

    A read that starts after the invalidation arrived can still find the old
    value on a replica that has not replayed the write; a replica in rotation
    is at most the lag bound behind (measured once per check interval). A
    fill that comes later than this is already past its TTL, which counts
    from when its read began, and is not stored either.
    """
    return settings.cache_ttl_s + settings.replica_max_lag_s + settings.replica_check_interval_s


def instrument(cache: ReadCache, meter: Meter) -> None:
    """Counters read from `cache.stats()` at collection time: nothing on the read path."""

    def observe(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(cache.stats()[field])]

        return callback

    prefix = f"{service.NAME}.cache"
    for field, description in (
        ("hits", "Reads by id the node's cache answered."),
        ("misses", "Reads by id the cache could not answer (absent, expired, or too old)."),
        ("refused", "Fills not stored: stamped before a tombstone or a detected loss."),
        ("evictions", "Entries pushed out by CATTLE_CACHE_MAX_ENTRIES."),
    ):
        meter.create_observable_counter(
            f"{prefix}.{field}", callbacks=[observe(field)], description=description
        )
    meter.create_observable_gauge(
        f"{prefix}.entries", callbacks=[observe("size")], description="Entries held now."
    )
