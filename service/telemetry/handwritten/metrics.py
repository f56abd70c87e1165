"""Metrics: the node's meter provider, its instruments, and the /metrics text.

Per-request instruments are few and cheap (one histogram gives rate, errors
by status and duration by route); everything that is a state rather than an
event (in-flight, lifecycle, pool use, replica lag) is an observable gauge
read only when Prometheus scrapes or the OTLP reader collects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

# Seconds. The semantic conventions' advisory buckets start at 5 ms; a node
# answers most reads in about a millisecond, so finer buckets are added below.
DURATION_BUCKETS_S: Sequence[float] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# Methods outside this set are reported as _OTHER (semantic conventions), so a
# client inventing methods cannot create new time series.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)

UNMATCHED_ROUTE = "<unmatched>"  # no route matched (404): never the raw path

# What the gauges read; None/empty until the part of the node they watch exists.
LifecycleSource = Callable[[], Any]  # an Enum member (the lifecycle state), or None
PoolsSource = Callable[[], Mapping[str, Any]]  # pool name -> SQLAlchemy Pool


class ReplicaLag(NamedTuple):
    replica: str
    seconds: float | None  # since it last replayed a transaction; None: not known yet
    wal_bytes: int | None  # WAL it has yet to replay


ReplicaLagSource = Callable[[], Iterable[ReplicaLag]]


def build_meter_provider(
    resource: Resource,
    readers: Sequence[MetricReader],
    environ: Mapping[str, str],
) -> MeterProvider:
    # Exemplars are not part of the Prometheus text format; checking the
    # current span for each measurement is paid per request for nothing, so
    # they are off unless OTEL_METRICS_EXEMPLAR_FILTER asks for them.
    exemplars = None if "OTEL_METRICS_EXEMPLAR_FILTER" in environ else AlwaysOffExemplarFilter()
    return MeterProvider(
        metric_readers=readers,
        resource=resource,
        exemplar_filter=exemplars,
        shutdown_on_exit=False,
    )


def new_registry() -> CollectorRegistry:
    # One registry per app: prometheus_client's global REGISTRY would mix the
    # series of every app a process builds (tests build many).
    return CollectorRegistry(auto_describe=False)


class HttpInstruments:
    """What the edge middleware records per request."""

    def __init__(self, meter: Meter) -> None:
        self.duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP requests by method, route template and status; "
            "its count is the request rate, 5xx statuses are the errors.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self.replays = meter.create_counter(
            "cattle.idempotency.replays",
            unit="{response}",
            description="Responses replayed for a repeated Idempotency-Key instead of "
            "doing the work again.",
        )

    def record(self, method: str, route: str, status: int, duration_s: float) -> None:
        self.duration.record(
            duration_s,
            {
                "http.request.method": method if method in KNOWN_METHODS else "_OTHER",
                "http.route": route,
                "http.response.status_code": status,
            },
        )

    def replayed(self, route: str) -> None:
        self.replays.add(1, {"http.route": route})


class NodeGauges:
    """Observable gauges over the node's state; the sources are attached later.

    Each source is asked only at collection time, so a gauge costs nothing on
    the request path and simply reports nothing while its source is absent.
    """

    def __init__(self) -> None:
        self.in_flight: Callable[[], int] = lambda: 0
        self.lifecycle: LifecycleSource = lambda: None
        self.pools: PoolsSource = dict
        # Empty until replicas exist (the replica work plugs its lag in here).
        self.replica_lag: ReplicaLagSource = tuple

    def register(self, meter: Meter) -> None:
        meter.create_observable_gauge(
            "http.server.active_requests",
            callbacks=[self._observe_in_flight],
            unit="{request}",
            description="Requests being served right now.",
        )
        meter.create_observable_gauge(
            "cattle.lifecycle.state",
            callbacks=[self._observe_lifecycle],
            description="1 for the node's current lifecycle state, 0 for the others.",
        )
        meter.create_observable_gauge(
            "db.client.connection.count",
            callbacks=[self._observe_pool_use],
            unit="{connection}",
            description="Connections of each pool, by state (used or idle).",
        )
        meter.create_observable_gauge(
            "db.client.connection.max",
            callbacks=[self._observe_pool_max],
            unit="{connection}",
            description="The most connections each pool may open (size plus overflow).",
        )
        meter.create_observable_gauge(
            "cattle.db.replica.lag",
            callbacks=[self._observe_replica_lag_s],
            unit="s",
            description="How far each read replica is behind the primary, in time "
            "(what decides whether it serves reads).",
        )
        meter.create_observable_gauge(
            "cattle.db.replica.lag_wal",
            callbacks=[self._observe_replica_lag_bytes],
            unit="By",
            description="How far each read replica is behind the primary, in WAL bytes.",
        )

    def _observe_in_flight(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.in_flight())]

    def _observe_lifecycle(self, _options: CallbackOptions) -> Iterable[Observation]:
        current = self.lifecycle()
        if current is None:
            return []
        return [
            Observation(int(state is current), {"state": state.value}) for state in type(current)
        ]

    def _observe_pool_use(self, _options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for name, pool in self.pools().items():
            # Only queue pools keep counts; others (NullPool) report nothing.
            if not hasattr(pool, "checkedout"):
                continue
            for state, count in (("used", pool.checkedout()), ("idle", pool.checkedin())):
                observations.append(
                    Observation(
                        count,
                        {
                            "db.client.connection.pool.name": name,
                            "db.client.connection.state": state,
                        },
                    )
                )
        return observations

    def _observe_pool_max(self, _options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for name, pool in self.pools().items():
            if hasattr(pool, "size") and hasattr(pool, "_max_overflow"):
                # _max_overflow has no public accessor; -1 means unbounded.
                overflow = max(pool._max_overflow, 0)
                observations.append(
                    Observation(pool.size() + overflow, {"db.client.connection.pool.name": name})
                )
        return observations

    def _observe_replica_lag_s(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(lag.seconds, {"replica": lag.replica})
            for lag in self.replica_lag()
            if lag.seconds is not None
        ]

    def _observe_replica_lag_bytes(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(lag.wal_bytes, {"replica": lag.replica})
            for lag in self.replica_lag()
            if lag.wal_bytes is not None
        ]
