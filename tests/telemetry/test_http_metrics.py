"""The node's own count of request durations says what the SDK's instruments would.

/metrics shows one of two: the node's count (HttpMetrics, the default) or,
when OTLP metrics export is on, the SDK's histogram and up-down counter
(SdkMetrics), which OTLP reads. A dashboard must not tell them apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry.http import HttpMetrics, SdkMetrics
from service.telemetry.metrics import DURATION_BUCKETS_S, build_meter_provider
from service.telemetry.tracing import build_resource

# (method, scheme, status, route, seconds, error type or "")
REQUESTS = [
    ("GET", "http", 200, "/v1/notes/{note_id}", 0.0004, ""),
    ("GET", "http", 200, "/v1/notes/{note_id}", 0.0010, ""),  # on a bucket's bound
    ("GET", "http", 200, "/v1/notes/{note_id}", 0.0300, ""),
    ("POST", "http", 201, "/v1/notes", 0.0040, ""),
    ("GET", "http", 404, "", 0.0002, ""),
    ("PATCH", "http", 503, "/v1/notes/{note_id}", 12.5, "503"),  # past the last bound
    ("_OTHER", "http", 405, "", 0.0001, ""),
]


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if not family.name.startswith("http_server_"):
            continue
        for sample in family.samples:
            # An empty label is an absent one to Prometheus.
            labels = frozenset((k, v) for k, v in sample.labels.items() if v != "")
            found[(sample.name, labels)] = sample.value
    return found


def _feed(metrics: HttpMetrics | SdkMetrics, *, still_open: int) -> None:
    for method, scheme, status, route, seconds, error in REQUESTS:
        metrics.started(method, scheme)
        metrics.finished(method, scheme, (method, status, route, "1.1", scheme, error), seconds)
    for _ in range(still_open):
        metrics.started("GET", "http")


@contextlib.contextmanager
def _both(*, still_open: int) -> Iterator[tuple[HttpMetrics, CollectorRegistry, CollectorRegistry]]:
    """The node's count and the SDK's instruments, fed the same requests, each in a registry."""
    counted_registry = CollectorRegistry(auto_describe=False)
    counted = HttpMetrics(DURATION_BUCKETS_S)
    counted_registry.register(counted)
    _feed(counted, still_open=still_open)
    sdk_registry = CollectorRegistry(auto_describe=False)
    provider = build_meter_provider(build_resource("n1"), sdk_registry)
    _feed(SdkMetrics(provider.get_meter("test")), still_open=still_open)
    try:
        yield counted, counted_registry, sdk_registry
    finally:
        provider.shutdown()


def test_the_nodes_count_renders_as_the_sdk_would() -> None:
    with _both(still_open=2) as (_, counted_registry, sdk_registry):
        ours, theirs = _samples(counted_registry), _samples(sdk_registry)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert abs(ours[key] - value) < 1e-9, (key, ours[key], value)
    in_flight = ("http_server_active_requests", frozenset({("http_request_method", "GET"),
                                                          ("url_scheme", "http")}))  # fmt: skip
    assert ours[in_flight] == 2


def test_control_a_bucket_off_by_one_is_caught() -> None:
    """The comparison above sees a duration counted in the wrong bucket."""
    with _both(still_open=0) as (counted, counted_registry, sdk_registry):
        key = ("GET", 200, "/v1/notes/{note_id}", "1.1", "http", "")
        counts = counted.durations[key]
        counts[0], counts[1] = counts[0] - 1, counts[1] + 1  # 1 ms counted as above 1 ms
        assert _samples(counted_registry) != _samples(sdk_registry)
