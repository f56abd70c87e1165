"""Metrics: the app's meter provider, and the gauges over the node's state.

What no instrumentation knows (lifecycle state, replica lag) is an observable gauge, read only
when Prometheus scrapes or the OTLP reader collects (requests: service.telemetry.http).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

import service

# Seconds. The semantic conventions' buckets start at 5 ms; a node answers
# most reads faster than that, so finer buckets come first.
DURATION_BUCKETS_S: Sequence[float] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class ReplicaLag(NamedTuple):
    replica: str
    seconds: float | None  # since it last replayed a transaction; None: not known yet
    wal_bytes: int | None  # WAL it has yet to replay


def build_meter_provider(resource: Resource, registry: CollectorRegistry) -> MeterProvider:
    """The app's provider, read by /metrics through `registry` (one per app:
    prometheus_client's global registry would mix the series of every app)."""
    return MeterProvider(
        metric_readers=[PrometheusMetricReader(scope_info_enabled=False, registry=registry)],
        resource=resource,
        views=[
            View(
                instrument_name="http.server.request.duration",
                aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S),
            )
        ],
        shutdown_on_exit=False,
    )


class NodeGauges:
    """Observable gauges whose sources other parts of the node plug in; a source is asked
    only at collection time, and until it is plugged in its gauge reports nothing."""

    def __init__(self, meter: Meter) -> None:
        self.states: Sequence[str] = ()
        self.current_state: Callable[[], str | None] = lambda: None
        self.replica_lag: Callable[[], Iterable[ReplicaLag]] = tuple
        meter.create_observable_gauge(
            f"{service.NAME}.lifecycle.state",
            callbacks=[self._observe_state],
            description="1 for the node's current lifecycle state, 0 for the others.",
        )
        for name, unit, field, how in (
            ("lag", "s", "seconds", "in time (what decides whether it serves reads)"),
            ("lag_wal", "By", "wal_bytes", "in WAL bytes"),
        ):
            meter.create_observable_gauge(
                f"{service.NAME}.db.replica.{name}",
                callbacks=[self._lag_of(field)],
                unit=unit,
                description=f"How far each read replica is behind the primary, {how}.",
            )

    def _observe_state(self, _options: CallbackOptions) -> Iterable[Observation]:
        current = self.current_state()
        if current is None:
            return []
        return [Observation(int(state == current), {"state": state}) for state in self.states]

    def _lag_of(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            lags = ((lag.replica, getattr(lag, field)) for lag in self.replica_lag())
            return [Observation(lag, {"replica": name}) for name, lag in lags if lag is not None]

        return observe
