"""Traces: the node's resource, its tracer provider, and SQL spans on its engines."""

from __future__ import annotations

import os

from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.metrics import UpDownCounter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import TracerProvider as AnyTracerProvider
from sqlalchemy.ext.asyncio import AsyncEngine

import service

# Parent-based, 10% of new traces, when OTEL_TRACES_SAMPLER is unset: export and collector
# load grow with every node (docs/observability.md, "Sampling").
DEFAULT_SAMPLER_RATIO = 0.1


def build_resource(node_id: str) -> Resource:
    """service.name/version (OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES honoured), and
    service.instance.id always the node id: a node's traces, metrics and logs join on its
    X-Served-By header."""
    resource = Resource.create(
        {"service.version": service.__version__, "service.instance.id": node_id}
    )
    # The SDK names an unnamed service "unknown_service[:...]".
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service.NAME}))
    return resource


def build_tracer_provider(resource: Resource) -> TracerProvider:
    """The app's own provider: a process (a test run) builds many apps, and
    the OTel global provider can be set only once per process."""
    # sampler=None: the SDK reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
    sampler = (
        None
        if os.environ.get("OTEL_TRACES_SAMPLER")
        else ParentBasedTraceIdRatio(DEFAULT_SAMPLER_RATIO)
    )
    # shutdown_on_exit=False: the lifespan shuts it down within a bound, and an
    # atexit hook would keep every test app alive until the process exits.
    return TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)


def trace_sql(
    engine: AsyncEngine, tracer_provider: AnyTracerProvider, connections: UpDownCounter
) -> None:
    """SQL spans (children of the request's span) and pool use for `engine` (pool use alone
    with a no-op `tracer_provider`), by the instrumentation's per-engine EngineTracer: its
    instrumentor patches create_engine once per process, so a second app would get nothing."""
    tracer = tracer_provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    EngineTracer(tracer, engine.sync_engine, connections)  # type: ignore[no-untyped-call]
