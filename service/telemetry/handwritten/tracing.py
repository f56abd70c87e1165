"""Traces: the node's resource, its sampler, its tracer provider and SQL spans.

Providers are per app, never the OTel globals: a process (a test run) builds
many apps, and the global providers can be set only once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    Decision,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

import service
from service.config import Settings

log = logging.getLogger("service.telemetry")

# Used only when OTEL_TRACES_SAMPLER is unset. Parent-based, so a trace begun
# upstream (a proxy, another node's bus message) is kept or dropped whole on
# every node it crosses; a 10% ratio for new traces keeps span export and
# collector load a tenth of the fleet's request rate (it grows with every node
# added) while still sampling hundreds of requests a minute at workshop loads.
# Raise it with OTEL_TRACES_SAMPLER_ARG; use a collector's tail sampling to
# keep every error.
DEFAULT_SAMPLER = "parentbased_traceidratio"
DEFAULT_SAMPLER_RATIO = 0.1

DEFAULT_SERVICE_NAME = "cattle"


def build_resource(settings: Settings) -> Resource:
    """service.name/version and service.instance.id = the node id.

    OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are honoured (the SDK reads
    them); the instance id is always the node id so traces, metrics and logs
    of one node join on the same value as X-Served-By.
    """
    resource = Resource.create(
        {"service.version": service.__version__, "service.instance.id": settings.node_id}
    )
    # The SDK names an unnamed service "unknown_service[:...]".
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def choose_sampler(environ: Mapping[str, str]) -> Sampler:
    """The sampler the standard OTEL_TRACES_SAMPLER(_ARG) variables name.

    Same names and meaning as the SDK; only the default differs (see
    DEFAULT_SAMPLER): the SDK's parentbased_always_on traces every request,
    too much for a fleet of CPU-bound nodes.
    """
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    fixed: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "parentbased_always_on": DEFAULT_ON,
        "parentbased_always_off": DEFAULT_OFF,
    }
    if name in fixed:
        return fixed[name]
    if name and name not in ("traceidratio", "parentbased_traceidratio"):
        log.warning(
            "OTEL_TRACES_SAMPLER=%s is not a sampler cattle knows; using %s",
            name,
            DEFAULT_SAMPLER,
        )
        name = ""
    # The spec's default ratio is 1.0 when a ratio sampler is named explicitly.
    ratio = _ratio(arg, default=1.0 if name else DEFAULT_SAMPLER_RATIO)
    if name == "traceidratio":
        return TraceIdRatioBased(ratio)
    return ParentBasedTraceIdRatio(ratio)


def _ratio(arg: str, *, default: float) -> float:
    if not arg:
        return default
    try:
        ratio = float(arg)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%s is not a ratio in [0, 1]; using %s", arg, default)
        return default
    return ratio


class ReceiverGate(Sampler):
    """The node's sampler: `inner`, once some span processor will receive spans.

    Until then (no OTLP endpoint set, the default) every span is dropped: a
    recorded span costs a request several times what a dropped one does (its
    attributes, its SQL children), and with nobody to hand it to the work
    would be thrown away at the span's end. Dropped spans still get trace and
    span ids, so log lines still carry them and trace context still
    propagates (as not sampled).
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.open = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if self.open:
            return self.inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None, parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return self.inner.get_description()


def build_tracer_provider(
    resource: Resource, environ: Mapping[str, str]
) -> tuple[TracerProvider, ReceiverGate]:
    """The app's tracer provider and its sampler's gate (opened by Telemetry
    when it adds a span processor)."""
    gate = ReceiverGate(choose_sampler(environ))
    # shutdown_on_exit=False: the app's lifespan shuts it down within a bound;
    # an atexit hook would also keep every test app alive until exit.
    provider = TracerProvider(resource=resource, sampler=gate, shutdown_on_exit=False)
    return provider, gate


# The SQLAlchemy instrumentation's pool usage counter is updated on every
# checkout and checkin; the node reports pool use from observable gauges read
# at collection time instead (service.telemetry.handwritten.metrics), so it gets a no-op,
# and its pool listeners are removed (see trace_sql).
_NO_POOL_COUNTER = NoOpMeterProvider().get_meter("cattle").create_up_down_counter("unused")
_POOL_EVENTS = ("connect", "close", "checkin", "checkout")


class _SampledOnlyEngineTracer(EngineTracer):
    """SQL spans only inside a recorded (sampled) span.

    The stock tracer builds attributes and a span for every statement, then
    the parent-based sampler drops it when the request is not sampled: pure
    cost on 90% of requests. Statements outside any request (the replica
    monitor, key purging, health checks) would each start a one-span trace of
    their own, a steady stream of noise; they are not traced either.
    """

    def _before_cur_exec(
        self, conn: Any, cursor: Any, statement: Any, params: Any, context: Any, executemany: Any
    ) -> Any:
        if not trace.get_current_span().is_recording():
            return statement, params
        return super()._before_cur_exec(  # type: ignore[no-untyped-call]
            conn, cursor, statement, params, context, executemany
        )


def trace_sql(engine: AsyncEngine, tracer_provider: TracerProvider) -> None:
    """SQL spans, children of the request's span, for the statements on `engine`.

    EngineTracer is the instrumentation's per-engine half; the instrumentor's
    `instrument()` would also patch sqlalchemy.create_engine process-wide and
    can run only once per process.
    """
    tracer = tracer_provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    sync_engine = engine.sync_engine
    engine_tracer = _SampledOnlyEngineTracer(tracer, sync_engine, _NO_POOL_COUNTER)  # type: ignore[no-untyped-call]
    # It also listens to every pool checkout and checkin to feed that counter:
    # four calls and four dicts per request, some 25 µs (3% of a read's CPU)
    # for a counter that goes nowhere. Only the statement listeners stay.
    for name in _POOL_EVENTS:
        listener = getattr(engine_tracer, f"_pool_{name}")
        if event.contains(sync_engine, name, listener):
            event.remove(sync_engine, name, listener)
