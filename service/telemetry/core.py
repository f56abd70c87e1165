"""One app's telemetry: its providers, exporters, gauges and their lifetime.

Built by create_app (no I/O, no threads); the lifespan starts the OTLP exporters' threads and
closes them within a bound, so a dead collector never holds up a node's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import CollectorRegistry, generate_latest

import service
from service.config import Settings
from service.telemetry import exporting, tracing
from service.telemetry.http import AccessLog, HttpMetrics, SdkMetrics
from service.telemetry.metrics import (
    DURATION_BUCKETS_S,
    NodeGauges,
    ReplicaLag,
    build_meter_provider,
)

if TYPE_CHECKING:
    from service.db.engines import Database

log = logging.getLogger(__name__)


class Telemetry:
    """Traces, metrics and their export for one app (`app.state.telemetry`).

    `enabled` is False with CATTLE_TELEMETRY_ENABLED=false or OTEL_SDK_DISABLED=true: no
    providers, no middleware, an empty /metrics (the access log has its own switch). Spans
    are made only for OTLP trace export or `span_processors` handed over in code: a span made
    for nobody costs a cached read 14.7 points of its throughput (docs/observability.md).
    """

    def __init__(self, settings: Settings, span_processors: Sequence[SpanProcessor] = ()) -> None:
        self.settings = settings
        sdk_disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        self.enabled = settings.telemetry_enabled and not sdk_disabled
        self.registry = CollectorRegistry(auto_describe=False)
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self.gauges: NodeGauges | None = None
        # Requests' durations and in-flight counts (service.telemetry.http).
        self.http_metrics: HttpMetrics | SdkMetrics | None = None
        self.access_log: AccessLog | None = None  # set by install() when on
        if self.enabled:
            # Providers now (they start no thread): the middleware takes them
            # when the app is first called, before the lifespan runs.
            resource = tracing.build_resource(settings.node_id)
            if span_processors or exporting.otlp_wanted("traces"):
                self.tracer_provider = tracing.build_tracer_provider(resource)
                for processor in span_processors:
                    self.tracer_provider.add_span_processor(processor)
            self.meter_provider = build_meter_provider(resource, self.registry)
            self.gauges = NodeGauges(self.meter_provider.get_meter(service.NAME))
            if exporting.otlp_wanted("metrics"):
                # OTLP reads the SDK's instruments; /metrics shows them too.
                meter = self.meter_provider.get_meter("service.telemetry.http")
                self.http_metrics = SdkMetrics(meter)
            else:
                counted = HttpMetrics(DURATION_BUCKETS_S)
                self.registry.register(counted)
                self.http_metrics = counted
        self._watches: list[exporting.ExportWatch] = []

    def start(self) -> None:
        """Start the OTLP exporters the OTEL_* variables ask for (each on its own thread).

        A bad value is reported by export_status(), never fatal: telemetry must not stop a node.
        """
        if self.tracer_provider is not None and exporting.otlp_wanted("traces"):
            with self._watched("traces") as watch:
                # A bounded queue (OTEL_BSP_MAX_QUEUE_SIZE): spans are dropped, never waited for.
                processor = BatchSpanProcessor(watch.attach(OTLPSpanExporter()))
                self.tracer_provider.add_span_processor(processor)
        if self.meter_provider is not None and exporting.otlp_wanted("metrics"):
            with self._watched("metrics") as watch:
                reader = PeriodicExportingMetricReader(watch.attach(OTLPMetricExporter()))
                self.meter_provider.add_metric_reader(reader)

    @contextlib.contextmanager
    def _watched(self, signal: exporting.Signal) -> Iterator[exporting.ExportWatch]:
        watch = exporting.ExportWatch(signal)
        self._watches.append(watch)
        try:
            yield watch
        except Exception as exc:
            log.error("OTLP %s export is off: %s", signal, exc)
            watch.failed(f"exporter could not be set up: {exc}")

    async def shutdown(self) -> None:
        """Flush what can be flushed within telemetry_shutdown_timeout_s, then let go.

        Each provider's shutdown (up to 30 s in the SDK) runs on a daemon thread, never joined
        (docs/observability.md, "When the collector is down").
        """
        if self.access_log is not None:
            self.access_log.flush()  # the requests of the last moments
        timeout_s = self.settings.telemetry_shutdown_timeout_s
        providers = [p for p in (self.tracer_provider, self.meter_provider) if p is not None]
        closing = [
            threading.Thread(target=p.shutdown, name="telemetry-close", daemon=True)
            for p in providers
        ]
        for thread in closing:
            thread.start()
        deadline = time.monotonic() + timeout_s
        while any(thread.is_alive() for thread in closing):
            if time.monotonic() > deadline:
                log.warning("telemetry did not close within %.1f s; leaving it behind", timeout_s)
                return
            await asyncio.sleep(0.02)

    def instrument_database(self, database: Database) -> None:
        """Pool use (and SQL spans when spans are made) for the node's engines; replica lag."""
        if self.meter_provider is None:
            return
        engines = [database.writer, *(replica.engine for replica in database.replicas.replicas)]
        if database.reader.pool is not database.writer.pool:
            # Otherwise a view of the writer (autocommit reads): traced once.
            engines.append(database.reader)
        meter = self.meter_provider.get_meter(service.NAME)
        # The instrument the SQLAlchemy instrumentation itself would create.
        connections = meter.create_up_down_counter(
            "db.client.connections.usage",
            unit="{connection}",
            description="Connections of each pool, by state (used or idle).",
        )
        tracer_provider = self.tracer_provider or NoOpTracerProvider()
        for engine in engines:
            tracing.trace_sql(engine, tracer_provider, connections)
        # Counted by the database layer (service/db/pool.py); read at collection.
        watch = database.pool_watch
        meter.create_observable_counter(
            f"{service.NAME}.db.pool.exhausted",
            callbacks=[lambda _options: [Observation(watch.exhausted_total)]],
            unit="{request}",
            description="Requests that got no pooled connection within the pool timeout.",
        )
        replicas = database.replicas.replicas
        self.observe_replica_lag(
            lambda: [ReplicaLag(r.name, r.lag_s, r.lag_bytes) for r in replicas]
        )

    def observe_lifecycle(self, states: Sequence[str], current: Callable[[], str | None]) -> None:
        """Report which of `states` the node is in (`current()`, read at collection); the
        health package owns the lifecycle, and whoever builds the app plugs it in."""
        if self.gauges is not None:
            self.gauges.states, self.gauges.current_state = states, current

    def observe_replica_lag(self, source: Callable[[], Iterable[ReplicaLag]]) -> None:
        if self.gauges is not None:
            self.gauges.replica_lag = source

    def export_status(self) -> exporting.ExportStatus:
        """Whether OTLP export works: for /healthz, a warning when failing."""
        return exporting.summarize(self._watches)

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition of this app's metrics (empty when disabled)."""
        return generate_latest(self.registry) if self.meter_provider is not None else b""
