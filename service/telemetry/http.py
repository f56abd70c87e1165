"""Per-request telemetry in one ASGI middleware: trace context, span, HTTP metrics, access line.

A request runs in its caller's trace context, gets a server span when the node makes spans, is
counted by route template (never the raw path) and written as one access line; probes and
scrapes are left alone. cattle's own for its cost, with spans on both sides: +21.8 points of
throughput against FastAPI's own telemetry, and the access line +16.2 points against uvicorn's
through python-json-logger (docs/observability.md, "Cost").
"""

from __future__ import annotations

import asyncio
import bisect
import json
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from time import perf_counter, time
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import service

# Probes and scrapes arrive every second or so from several proxies: traced
# and counted, they would be most of a node's spans and say nothing.
QUIET_PATHS = frozenset({"/livez", "/readyz", "/startupz", "/healthz", "/metrics"})

# Query parameters the conventions say to redact in url.query (signed URLs).
_SENSITIVE_QUERY_PARAMETERS = frozenset(
    {"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature", "X-Amz-Signature",
     "X-Amz-Credential", "X-Amz-Security-Token"}
)  # fmt: skip

# The methods the conventions name; any other is counted as "_OTHER".
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)

DURATION_NAME = "http.server.request.duration"
ACTIVE_NAME = "http.server.active_requests"
DURATION_HELP = "Duration of HTTP server requests."
ACTIVE_HELP = "Number of active HTTP server requests."

# Label names as the Prometheus exposition writes them, in its (sorted) order.
_DURATION_LABELS = (
    "error_type",
    "http_request_method",
    "http_response_status_code",
    "http_route",
    "network_protocol_version",
    "url_scheme",
)


def is_quiet(path: str) -> bool:
    """A probe or scrape path, with or without a suffix (/readyz/primary)."""
    return "/" + path.partition("?")[0].split("/", 2)[1] in QUIET_PATHS


# (method, status, route, http version, scheme, error type or "")
DurationKey = tuple[str, int, str, str, str, str]
# One request as the access log keeps it until the flush: time, client, method,
# path with query, HTTP version, status, route, seconds, (trace id, span id).
_Access = tuple[float, str, str, str, str, int, str, float, tuple[int, int] | None]
# json.dumps of one string (quoted, escaped, ASCII), without json.dumps's own setup.
_quote = encode_basestring_ascii


class HttpMetrics(Collector):
    """Request durations and in-flight counts, counted in the node and rendered at scrape
    time as the SDK's Prometheus reader would (same names and labels): 0.8% of a cached
    read against 5.5% with prometheus_client's Histogram and Gauge (docs/results/otel-cost.md).
    """

    def __init__(self, buckets_s: Sequence[float]) -> None:
        self.bounds = tuple(buckets_s)
        # key -> [count per bucket (the last one past every bound)..., sum]
        self.durations: dict[DurationKey, list[float]] = {}
        self.active: dict[tuple[str, str], int] = {}

    def started(self, method: str, scheme: str) -> None:
        key = (method, scheme)
        self.active[key] = self.active.get(key, 0) + 1

    def finished(self, method: str, scheme: str, key: DurationKey, seconds: float) -> None:
        self.active[(method, scheme)] -= 1
        counts = self.durations.get(key)
        if counts is None:
            counts = self.durations[key] = [0.0] * (len(self.bounds) + 2)
        counts[bisect.bisect_left(self.bounds, seconds)] += 1
        counts[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        """The counts as Prometheus families (a registry calls it at each scrape)."""
        bounds = [f"{bound}" for bound in self.bounds] + ["+Inf"]
        histogram = HistogramMetricFamily(
            "http_server_request_duration_seconds", DURATION_HELP, labels=_DURATION_LABELS
        )
        for (method, status, route, version, scheme, error), counts in list(self.durations.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, counts[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            labels = [error, method, str(status), route, version, scheme]
            histogram.add_metric(labels, buckets, counts[-1])
        yield histogram
        active = GaugeMetricFamily(
            "http_server_active_requests", ACTIVE_HELP, labels=("http_request_method", "url_scheme")
        )
        for (method, scheme), count in list(self.active.items()):
            active.add_metric([method, scheme], count)
        yield active


class SdkMetrics:
    """The same counts through the SDK's instruments, for OTLP export (the buckets are the
    meter provider's view: service.telemetry.metrics.build_meter_provider)."""

    def __init__(self, meter: Meter) -> None:
        self.duration = meter.create_histogram(DURATION_NAME, unit="s", description=DURATION_HELP)
        self.active = meter.create_up_down_counter(
            ACTIVE_NAME, unit="{request}", description=ACTIVE_HELP
        )

    def started(self, method: str, scheme: str) -> None:
        self.active.add(1, {"http.request.method": method, "url.scheme": scheme})

    def finished(self, method: str, scheme: str, key: DurationKey, seconds: float) -> None:
        self.active.add(-1, {"http.request.method": method, "url.scheme": scheme})
        self.duration.record(seconds, _attributes(key))


def _attributes(key: DurationKey) -> dict[str, Any]:
    """A finished request's attributes, shared by its span and its SDK duration record."""
    method, status, route, version, scheme, error = key
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "http.response.status_code": status,
        "network.protocol.version": version,
        "url.scheme": scheme,
    }
    if route:
        attributes["http.route"] = route
    if error:
        attributes["error.type"] = error
    return attributes


class AccessLog:
    """One JSON line per request on stdout, in the node's log format, written in batches.

    One write FLUSH_S after the first waiting line, at FLUSH_LINES, and when the node stops.
    2.86 µs a line against 12.11 µs through the logging module and python-json-logger
    (docs/results/otel-cost.md); the fields, and what SIGKILL loses: docs/observability.md.
    """

    LOGGER = "service.access"
    FLUSH_S = 0.1
    FLUSH_LINES = 256

    def __init__(self, node_id: str, stream: TextIO | None = None) -> None:
        # The fields every line shares, encoded once: '{"level": ..., "logger": ...' and
        # '"node_id": ..., "service": ...'.
        self.head = json.dumps({"level": "INFO", "logger": self.LOGGER})[:-1]
        self.node = json.dumps({"node_id": node_id, "service": service.NAME})[1:-1]
        self.stream = stream  # None: sys.stdout as it is at each flush
        self.waiting: list[_Access] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""

    def write(
        self, scope: Scope, status: int, route: str, seconds: float, span: trace.Span | None
    ) -> None:
        """Note the request; its line is formatted and written at the next flush."""
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else ""
        path = scope["path"]
        if query := scope.get("query_string"):
            path = f"{path}?{query.decode('latin-1')}"
        version = scope.get("http_version", "")
        ids = None
        if span is not None:
            context = span.get_span_context()
            if context.is_valid:
                ids = (context.trace_id, context.span_id)
        self.waiting.append(
            (time(), peer, scope["method"], path, version, status, route, seconds, ids)
        )
        if len(self.waiting) >= self.FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)

    def flush(self) -> None:
        """Write the waiting lines now (also when the node stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.waiting:
            waiting, self.waiting = self.waiting, []
            stream = self.stream or sys.stdout
            stream.write("".join([self._line(access) for access in waiting]))
            stream.flush()

    def _line(self, access: _Access) -> str:
        # One f-string, each text field escaped by the json module's encoder: 2.86 µs
        # against 6.08 µs for json.dumps of the line as a dict (docs/results/otel-cost.md).
        at, client, method, path, version, status, route, seconds, ids = access
        message = f'{client} - "{method} {path} HTTP/{version}" {status}'
        trace_ids = f', "trace_id": "{ids[0]:032x}", "span_id": "{ids[1]:016x}"' if ids else ""
        return (
            f'{self.head}, "message": {_quote(message)}, {self.node}, '
            f'"client": {_quote(client)}, "method": {_quote(method)}, "path": {_quote(path)}, '
            f'"route": {_quote(route)}, "status": {status}, '
            f'"duration_ms": {round(seconds * 1000, 3)}{trace_ids}, "time": "{self._time(at)}"}}\n'
        )

    def _time(self, at: float) -> str:
        """ISO 8601 in UTC with microseconds; the date and time of day worked out once a second."""
        second = int(at)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int((at - second) * 1e6):06d}+00:00"


class HttpTelemetry:
    """The ASGI middleware (each part optional: telemetry and the access log have their own
    switches). With `traced`, a request runs in its caller's trace context, so its log lines,
    access line and bus messages carry the caller's trace id even when the node makes no span.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        traced: bool,
        tracer_provider: trace.TracerProvider | None,
        metrics: HttpMetrics | SdkMetrics | None,
        access: AccessLog | None,
    ) -> None:
        self.app = app
        self.traced = traced
        self.tracer = tracer_provider.get_tracer(__name__) if tracer_provider else None
        self.metrics = metrics
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A probe or scrape: no span, not counted, in the access log only when it fails.
        quiet = is_quiet(scope["path"])
        if quiet and self.access is None:
            await self.app(scope, receive, send)
            return
        metrics = None if quiet else self.metrics
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "_OTHER"
        scheme = scope.get("scheme", "http")
        span = token = None  # the node's span, or its caller's when the node makes none
        if self.traced and not quiet:
            parent = _incoming(scope["headers"])
            if self.tracer is not None:
                span = self.tracer.start_span(
                    "HTTP" if method == "_OTHER" else method, parent, kind=SpanKind.SERVER
                )
                parent = trace.set_span_in_context(span, parent)
            elif parent is not None:
                span = trace.get_current_span(parent)
            if parent is not None:
                token = otel_context.attach(parent)
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if metrics is not None:
            metrics.started(method, scheme)
        started = perf_counter()
        error = ""
        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            error = type(exc).__qualname__
            raise
        finally:
            seconds = perf_counter() - started
            if token is not None:
                otel_context.detach(token)
            route = getattr(scope.get("route"), "path", "")
            status = status or 500  # no response started: the server's answer is a 500
            if not error and status >= 500:
                error = str(status)
            key = (method, status, route, scope.get("http_version", ""), scheme, error)
            if metrics is not None:
                metrics.finished(method, scheme, key, seconds)
            if span is not None and span.is_recording():
                _describe(span, scope, key)
                span.end()
            if self.access is not None and (not quiet or status >= 500):
                self.access.write(scope, status, route, seconds, span)


def _incoming(headers: list[tuple[bytes, bytes]]) -> otel_context.Context | None:
    """The upstream trace context, if the request carries one (most do not)."""
    for name, _ in headers:
        if name in (b"traceparent", b"tracestate", b"baggage"):
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
            return propagate.extract(carrier)
    return None


def _describe(span: trace.Span, scope: Scope, key: DurationKey) -> None:
    """A recorded span's name and attributes (a dropped one needs none)."""
    _, status, route, _, _, error = key
    if route:
        span.update_name(f"{span.name} {route}")  # type: ignore[attr-defined]
    attributes = _attributes(key)
    attributes["url.path"] = scope["path"]
    if scope.get("query_string"):
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        attributes["url.query"] = urlencode(
            [(k, "REDACTED" if k in _SENSITIVE_QUERY_PARAMETERS else v) for k, v in pairs]
        )
    server = scope.get("server")
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    span.set_attributes(attributes)
    if status >= 500 or error:
        span.set_status(StatusCode.ERROR)
