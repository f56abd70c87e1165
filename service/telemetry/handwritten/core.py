"""One app's telemetry: its providers, exporters, gauges and their lifetime.

Built by create_app (no I/O, no threads), started and shut down by the
lifespan: the OTLP exporters' threads exist only while the app runs, and
closing them is bounded so a dead collector never holds up a node's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import generate_latest

from service.config import Settings
from service.telemetry.handwritten import tracing
from service.telemetry.handwritten.exporting import (
    ExportStatus,
    ExportWatch,
    Signal,
    WatchedMetricExporter,
    WatchedSpanExporter,
    otlp_wanted,
    summarize,
)
from service.telemetry.handwritten.logs import AccessLog
from service.telemetry.handwritten.metrics import (
    HttpInstruments,
    LifecycleSource,
    NodeGauges,
    ReplicaLag,
    ReplicaLagSource,
    build_meter_provider,
    new_registry,
)
from service.telemetry.handwritten.propagation import propagation_headers
from service.telemetry.handwritten.requests import RequestRecorder

if TYPE_CHECKING:
    from service.db.engines import Database

log = logging.getLogger("service.telemetry")

INSTRUMENTATION_NAME = "cattle"


class Telemetry:
    """Traces, metrics and their export for one app (`app.state.telemetry`).

    `enabled` is False with CATTLE_TELEMETRY_ENABLED=false or OTEL_SDK_DISABLED=true:
    no spans, no instruments, an empty /metrics; the access log is separate
    (CATTLE_ACCESS_LOG).
    """

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        sdk_disabled = self.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        self.enabled = settings.telemetry_enabled and not sdk_disabled
        # Finished requests, recorded in batches into the metrics and the access log.
        self.requests = RequestRecorder()
        if settings.access_log:
            self.requests.access_log = AccessLog(settings.node_id)
        self.resource = tracing.build_resource(settings)
        # Built now (it starts no thread) so that tests and other parts of the
        # node can add span processors or get tracers before the app starts.
        self.tracer_provider: TracerProvider | None = None
        # The provider's sampler: the configured one (`.inner`) behind a gate
        # that drops every span until a span processor exists.
        self.sampler_gate: tracing.ReceiverGate | None = None
        if self.enabled:
            self.tracer_provider, self.sampler_gate = tracing.build_tracer_provider(
                self.resource, self.environ
            )
        self.server_tracer: trace.Tracer | None = (
            self.tracer_provider.get_tracer(INSTRUMENTATION_NAME) if self.tracer_provider else None
        )
        # Read once: the propagators are set up when opentelemetry.propagate loads.
        self.propagation_headers = propagation_headers()
        self.registry = new_registry()
        self.meter_provider: MeterProvider | None = None
        self.gauges = NodeGauges()
        self.started = False
        self._watches: list[ExportWatch] = []
        self._span_processor: BatchSpanProcessor | None = None

    # -- lifetime -------------------------------------------------------------

    def start(self) -> None:
        """Create instruments and the OTLP exporters the environment asks for."""
        if self.started:
            return
        if self.enabled:
            self._start_metrics()
            self._start_trace_export()
        self.started = True

    def _start_metrics(self) -> None:
        # PrometheusMetricReader is a pull reader: /metrics collects on demand.
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers: list[MetricReader] = [
            PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)
        ]
        watch = self._watch("metrics")
        if watch is not None:
            try:
                # Imported here: nothing of the OTLP stack loads unless it is used.
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )

                metric_exporter = OTLPMetricExporter()
                watch.endpoint = metric_exporter._endpoint
                # Interval and timeout: OTEL_METRIC_EXPORT_INTERVAL/_TIMEOUT.
                readers.append(
                    PeriodicExportingMetricReader(WatchedMetricExporter(metric_exporter, watch))
                )
            except Exception as exc:  # a bad OTEL_* value must not stop the node serving
                self._export_broken(watch, exc)
        self.meter_provider = build_meter_provider(self.resource, readers, self.environ)
        meter = self.meter_provider.get_meter(INSTRUMENTATION_NAME)
        self.requests.http = HttpInstruments(meter)
        self.gauges.register(meter)

    def _start_trace_export(self) -> None:
        assert self.tracer_provider is not None
        watch = self._watch("traces")
        if watch is None:
            return
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
            watch.endpoint = span_exporter._endpoint
            # A bounded queue (OTEL_BSP_MAX_QUEUE_SIZE, default 2048) drained by
            # a background thread: when the collector is away, spans are
            # dropped, never waited for.
            self._span_processor = BatchSpanProcessor(WatchedSpanExporter(span_exporter, watch))
        except Exception as exc:
            self._export_broken(watch, exc)
            return
        self.add_span_processor(self._span_processor)

    def _watch(self, signal: Signal) -> ExportWatch | None:
        """A watch for `signal`'s OTLP export, if the environment asks for it."""
        if not otlp_wanted(signal, self.environ):
            return None
        protocol = self.environ.get(
            f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL",
            self.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        )
        if protocol != "http/protobuf":
            log.warning("OTLP over %s is not shipped; using http/protobuf", protocol)
        watch = ExportWatch(signal, endpoint="(not set up)")
        self._watches.append(watch)
        return watch

    @staticmethod
    def _export_broken(watch: ExportWatch, exc: Exception) -> None:
        log.error("OTLP %s export is off: %s", watch.signal, exc)
        watch.failed_to_start(exc)

    async def shutdown(self) -> None:
        """Flush what can be flushed within telemetry_shutdown_timeout_s, then let go.

        The SDK's shutdowns wait up to 30 s for a collector that may be gone;
        each runs on a daemon thread and the node stops waiting at the bound.
        """
        if not self.started:
            return
        self.started = False
        self.requests.flush()
        timeout_s = self.settings.telemetry_shutdown_timeout_s
        closing: list[asyncio.Future[None]] = []
        if self._span_processor is not None:
            closing.append(_in_daemon_thread(self._span_processor.shutdown))
        if self.meter_provider is not None:
            provider = self.meter_provider
            closing.append(
                _in_daemon_thread(lambda: provider.shutdown(timeout_millis=timeout_s * 1000))
            )
        if not closing:
            return
        _done, pending = await asyncio.wait(closing, timeout=timeout_s)
        if pending:
            log.warning("telemetry did not close within %.1f s; leaving it behind", timeout_s)

    # -- what other parts of the node use ------------------------------------

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """Hand finished spans to `processor` too (an exporter, a test's memory).

        Spans are sampled only once some processor receives them (see
        tracing.ReceiverGate); before that every span is dropped.
        """
        if self.tracer_provider is None or self.sampler_gate is None:
            raise RuntimeError("telemetry is disabled: there are no spans to process")
        self.tracer_provider.add_span_processor(processor)
        self.sampler_gate.open = True

    def tracer(self, name: str) -> trace.Tracer:
        """A tracer for a part of the node (e.g. the bus); no-op when disabled."""
        if self.tracer_provider is None:
            return trace.NoOpTracer()
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        """A meter for a part of the node (e.g. the bus, the read cache).

        Real once the telemetry has started (the lifespan's first step), a
        no-op before that and when telemetry is disabled.
        """
        if self.meter_provider is None:
            return metrics.NoOpMeter(name)
        return self.meter_provider.get_meter(name)

    def instrument_database(self, database: Database) -> None:
        """SQL spans for the node's engines; pool use and replica lag in the metrics."""
        engines = {"writer": database.writer, "reader": database.reader}
        if database.reader.pool is database.writer.pool:
            # A view of the writer (autocommit reads): its events and pool are
            # the writer's, so traced and reported once.
            del engines["reader"]
        replicas = database.replicas.replicas
        engines.update((replica.name, replica.engine) for replica in replicas)
        if self.tracer_provider is not None:
            for engine in engines.values():
                tracing.trace_sql(engine, self.tracer_provider)
        self.gauges.pools = lambda: {name: engine.pool for name, engine in engines.items()}
        self.observe_replica_lag(
            lambda: [ReplicaLag(r.name, r.lag_s, r.lag_bytes) for r in replicas]
        )

    def observe_in_flight(self, source: Callable[[], int]) -> None:
        """Report `source()` as the requests in flight (the health counter's)."""
        self.gauges.in_flight = source

    def observe_lifecycle(self, source: LifecycleSource) -> None:
        """Report the lifecycle state `source()` returns (a State, or None)."""
        self.gauges.lifecycle = source

    def observe_replica_lag(self, source: ReplicaLagSource) -> None:
        """Report replica lag: `source()` yields (replica name, lag in bytes)."""
        self.gauges.replica_lag = source

    def export_status(self) -> ExportStatus:
        """Whether OTLP export works: for /healthz, a warning when failing."""
        return summarize(self._watches)

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition of this app's metrics."""
        if self.meter_provider is None:
            return b""
        self.requests.flush()  # every request finished so far is counted
        return generate_latest(self.registry)


def _in_daemon_thread(close: Callable[[], object]) -> asyncio.Future[None]:
    """Run `close` on a daemon thread; the future completes when it returns.

    Not asyncio.to_thread: the default executor is joined without a bound
    when the event loop closes, and a daemon thread never holds up the exit.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            close()
        except Exception:
            log.warning("closing telemetry failed", exc_info=True)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=run, name="telemetry-close", daemon=True).start()
    return done
