"""Traces: the node's resource, its tracer provider, and SQL spans on its engines."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.metrics import UpDownCounter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
)
from sqlalchemy.ext.asyncio import AsyncEngine

import service

# Used only when OTEL_TRACES_SAMPLER is unset (set it, and _ARG, to change
# either). Parent-based, so a trace begun upstream is kept or dropped whole on
# every node it crosses; 10% of new traces, because span export and collector
# load grow with every node added. The SDK's own default traces every request.
DEFAULT_SAMPLER_RATIO = 0.1


def build_resource(node_id: str) -> Resource:
    """service.name/version, and service.instance.id = the node id.

    OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are honoured (the SDK reads
    them); the instance id is always the node id, so traces, metrics and logs
    of one node join on the value of its X-Served-By header.
    """
    resource = Resource.create(
        {"service.version": service.__version__, "service.instance.id": node_id}
    )
    # The SDK names an unnamed service "unknown_service[:...]".
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service.NAME}))
    return resource


# Hand-written parts under measurement (CATTLE_TELEMETRY_PARTS=gate,lean-sql);
# kept only if the benchmark shows each buys at least 3 points of throughput.
PARTS = frozenset(os.environ.get("CATTLE_TELEMETRY_PARTS", "").split(","))


class ReceiverGate(Sampler):
    """`inner`, once some span processor will receive spans; until then every
    span is dropped (it still gets ids, for the logs and propagation)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.open = False

    def should_sample(  # type: ignore[no-untyped-def]
        self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
        trace_state=None,
    ) -> SamplingResult:  # fmt: skip
        if self.open:
            return self.inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None, parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return self.inner.get_description()


def build_tracer_provider(resource: Resource) -> TracerProvider:
    """The app's own provider: a process (a test run) builds many apps, and
    the OTel global provider can be set only once per process."""
    # sampler=None: the SDK reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
    sampler: Sampler | None = (
        None
        if os.environ.get("OTEL_TRACES_SAMPLER")
        else ParentBasedTraceIdRatio(DEFAULT_SAMPLER_RATIO)
    )
    if "gate" in PARTS:
        sampler = ReceiverGate(sampler or TracerProvider(shutdown_on_exit=False).sampler)
    # shutdown_on_exit=False: the lifespan shuts it down within a bound, and an
    # atexit hook would keep every test app alive until the process exits.
    return TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)


def open_gate(provider: TracerProvider) -> None:
    if isinstance(provider.sampler, ReceiverGate):
        provider.sampler.open = True


class LeanEngineTracer(EngineTracer):
    """SQL spans only inside a recorded span: no span work for unsampled requests."""

    def _before_cur_exec(  # type: ignore[no-untyped-def]
        self, conn, cursor, statement, params, context, executemany
    ):
        if not trace.get_current_span().is_recording():
            return statement, params
        return super()._before_cur_exec(  # type: ignore[no-untyped-call]
            conn, cursor, statement, params, context, executemany
        )


def trace_sql(
    engine: AsyncEngine, tracer_provider: TracerProvider, connections: UpDownCounter
) -> None:
    """SQL spans (children of the request's span) and pool use for `engine`.

    EngineTracer is the SQLAlchemy instrumentation's per-engine part; its
    instrumentor's `instrument()` would patch create_engine process-wide, and
    runs once per process, so a second app would get nothing.
    """
    tracer = tracer_provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    tracer_class = LeanEngineTracer if "lean-sql" in PARTS else EngineTracer
    tracer_class(tracer, engine.sync_engine, connections)  # type: ignore[no-untyped-call]
