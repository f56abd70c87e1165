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
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, generate_latest

import service
from service.config import Settings
from service.telemetry import tracing
from service.telemetry.exporting import (
    ExportStatus,
    ExportWatch,
    Signal,
    WatchedMetricExporter,
    WatchedSpanExporter,
    otlp_wanted,
    summarize,
)
from service.telemetry.metrics import NodeGauges, ReplicaLag, build_meter_provider

if TYPE_CHECKING:
    from service.db.engines import Database

log = logging.getLogger(__name__)


class Telemetry:
    """Traces, metrics and their export for one app (`app.state.telemetry`).

    `enabled` is False with CATTLE_TELEMETRY_ENABLED=false or OTEL_SDK_DISABLED=true:
    no providers, no middleware, an empty /metrics. The access log has its own
    switch (CATTLE_ACCESS_LOG).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        sdk_disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        self.enabled = settings.telemetry_enabled and not sdk_disabled
        self.registry = CollectorRegistry(auto_describe=False)
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self.gauges: NodeGauges | None = None
        if self.enabled:
            # Providers now (they start no thread): the middleware takes them
            # when the app is first called, before the lifespan runs.
            resource = tracing.build_resource(settings.node_id)
            self.tracer_provider = tracing.build_tracer_provider(resource)
            self.meter_provider = build_meter_provider(resource, self.registry)
            self.gauges = NodeGauges(self.meter_provider.get_meter(service.NAME))
        self._watches: list[ExportWatch] = []

    def start(self) -> None:
        """Start the OTLP exporters the OTEL_* variables ask for (each its own thread).

        The exporters read their endpoint, headers, timeout, batching and
        interval from the same variables; a bad value is reported by
        export_status(), never fatal.
        """
        if self.tracer_provider is not None and otlp_wanted("traces"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            watch = self._watch("traces")
            try:
                span_exporter = OTLPSpanExporter()
                watch.endpoint = span_exporter._endpoint
                # A bounded queue (OTEL_BSP_MAX_QUEUE_SIZE): when the collector
                # is away, spans are dropped, never waited for.
                processor = BatchSpanProcessor(WatchedSpanExporter(span_exporter, watch))
                self.tracer_provider.add_span_processor(processor)
            except Exception as exc:  # a bad OTEL_* value must not stop the node serving
                self._broken(watch, exc)
        if self.meter_provider is not None and otlp_wanted("metrics"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            watch = self._watch("metrics")
            try:
                metric_exporter = OTLPMetricExporter()
                watch.endpoint = metric_exporter._endpoint
                reader = PeriodicExportingMetricReader(
                    WatchedMetricExporter(metric_exporter, watch)
                )
                self.meter_provider.add_metric_reader(reader)
            except Exception as exc:
                self._broken(watch, exc)

    def _watch(self, signal: Signal) -> ExportWatch:
        watch = ExportWatch(signal, endpoint="(not set up)")
        self._watches.append(watch)
        return watch

    @staticmethod
    def _broken(watch: ExportWatch, exc: Exception) -> None:
        log.error("OTLP %s export is off: %s", watch.signal, exc)
        watch.failed_to_start(exc)

    async def shutdown(self) -> None:
        """Flush what can be flushed within telemetry_shutdown_timeout_s, then let go.

        The SDK's shutdowns wait up to 30 s for a collector that may be gone;
        each runs on a daemon thread and the node stops waiting at the bound.
        """
        timeout_s = self.settings.telemetry_shutdown_timeout_s
        closing: list[asyncio.Future[None]] = []
        if self.tracer_provider is not None:
            closing.append(_in_daemon_thread(self.tracer_provider.shutdown))
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

    def instrument_database(self, database: Database) -> None:
        """SQL spans and pool use for the node's engines; replica lag in the metrics."""
        engines = [database.writer, *(replica.engine for replica in database.replicas.replicas)]
        if database.reader.pool is not database.writer.pool:
            # Otherwise a view of the writer (autocommit reads): traced once.
            engines.append(database.reader)
        if self.tracer_provider is not None and self.meter_provider is not None:
            # The instrument the SQLAlchemy instrumentation itself would create.
            connections = self.meter_provider.get_meter(service.NAME).create_up_down_counter(
                "db.client.connections.usage",
                unit="{connection}",
                description="Connections of each pool, by state (used or idle).",
            )
            for engine in engines:
                tracing.trace_sql(engine, self.tracer_provider, connections)
        replicas = database.replicas.replicas
        self.observe_replica_lag(
            lambda: [ReplicaLag(r.name, r.lag_s, r.lag_bytes) for r in replicas]
        )

    def observe_lifecycle(self, states: Sequence[str], current: Callable[[], str | None]) -> None:
        """Report which of `states` the node is in (`current()`, read at collection).

        The health package owns the lifecycle; whoever builds the app plugs it in.
        """
        if self.gauges is not None:
            self.gauges.states, self.gauges.current_state = states, current

    def observe_replica_lag(self, source: Callable[[], Iterable[ReplicaLag]]) -> None:
        if self.gauges is not None:
            self.gauges.replica_lag = source

    def export_status(self) -> ExportStatus:
        """Whether OTLP export works: for /healthz, a warning when failing."""
        return summarize(self._watches)

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition of this app's metrics (empty when disabled)."""
        return generate_latest(self.registry) if self.meter_provider is not None else b""


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
