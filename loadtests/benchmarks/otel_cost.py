"""Benchmark: what the OpenTelemetry SDK's per-request calls cost, beside a whole read.

    python -m loadtests.benchmarks.otel_cost   # ~1 min; docs/results/otel-cost.{md,json}

The telemetry benchmark gives the cost of telemetry as a whole; this one says
where its floor is. In one process, round after round in a rotated order, it
times (CPU time of the calling thread, per call):

  read            GET /v1/notes/{id} answered from the node's cache, through
                  the whole app called in-process (no socket, no server), with
                  telemetry off: the reference, a node's cheapest request
  read+telemetry  the same app with telemetry on and spans made (a node with
                  trace export): cattle's own middleware (service/telemetry/http.py:
                  span, HTTP metrics; the access log off, it is timed on its
                  own below; loadtests.benchmarks.stock_node, STOCK_TELEMETRY=spans)
  read+telemetry-no-span  the same as a node with no trace export configured
                  makes it: HTTP metrics and timing, no span
  read+fastapi-telemetry  the same, the spans and HTTP metrics by FastAPI's own
                  OpenTelemetry support instead (loadtests.benchmarks.stock_node)
  record          one Histogram.record of a request duration with the five
                  attributes FastAPI gives it, on a provider built as the
                  node builds its own (Prometheus reader, bucket view)
  add             one UpDownCounter.add with two attributes (in-flight
                  requests: twice per request)
  count           what cattle's middleware does instead of those three: one
                  request started and finished in the node's own count
  count-prometheus-client  the same with prometheus_client's Histogram and
                  Gauge (labels looked up, in-flight up and down, one observe)
  span-dropped    start and end of a server span the sampler drops
  span-recorded   start and end of a server span that is recorded (no
                  processor: what recording alone costs)
  access-log-stock  one access line as uvicorn writes it, through the logging
                  module, the node's trace filter and python-json-logger, to a file
  access-log      one access line as the node writes it (AccessLog), to a file
  access-log-json-dumps  the same line made by json.dumps of a dict and
                  datetime.isoformat per line (how AccessLog formatted it
                  before its f-string), to a file

The report divides each by the read's cost measured in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue
from prometheus_client import CollectorRegistry, Gauge, Histogram
from starlette.types import Message, Scope

from loadtests import report as reports
from loadtests.benchmarks import stock_node
from service import domains
from service.app import create_app
from service.config import Settings
from service.db import migrate
from service.telemetry.http import AccessLog, HttpMetrics
from service.telemetry.logs import TraceContext, json_formatter
from service.telemetry.metrics import DURATION_BUCKETS_S, build_meter_provider
from service.telemetry.tracing import build_resource

RESULTS = reports.RESULTS / "otel-cost"
READ = "read"
OURS = "read+telemetry"
NO_SPAN = "read+telemetry-no-span"
FASTAPI = "read+fastapi-telemetry"
# What FastAPI records a request's duration with (a GET that matched a route).
DURATION_ATTRIBUTES: dict[str, AttributeValue] = {
    "url.scheme": "http",
    "http.request.method": "GET",
    "network.protocol.version": "1.1",
    "http.route": "/v1/notes/{note_id}",
    "http.response.status_code": 200,
}
IN_FLIGHT_ATTRIBUTES: dict[str, AttributeValue] = {
    "url.scheme": "http",
    "http.request.method": "GET",
}

Case = Callable[[], Awaitable[None]]


async def _call(
    app: FastAPI, state: dict[str, Any], method: str, path: str, body: bytes = b""
) -> list[Message]:
    """One request to `app` as uvicorn would hand it over; the messages it sent."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"node"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": dict(state),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def _read_case(app: FastAPI, state: dict[str, Any]) -> Case:
    """A read of one note, written through the app itself and read once to fill the cache."""
    note = json.dumps({"title": "bench", "body": "x" * 200}).encode()
    created = await _call(app, state, "POST", "/v1/notes", note)
    assert created[0]["status"] == 201, created
    path = "/v1/notes/" + json.loads(created[1]["body"])["id"]

    async def read() -> None:
        sent = await _call(app, state, "GET", path)
        assert sent[0]["status"] == 200, sent

    await read()
    return read


def _sync(function: Callable[[], object]) -> Case:
    async def case() -> None:
        function()

    return case


def _sdk_cases(
    log: logging.StreamHandler[Any], node_access: AccessLog, dumps_access: AccessLog
) -> dict[str, Case]:
    resource = build_resource("bench")
    meter = build_meter_provider(resource, CollectorRegistry(auto_describe=False)).get_meter("b")
    duration = meter.create_histogram("http.server.request.duration", unit="s")
    in_flight = meter.create_up_down_counter("http.server.active_requests")
    dropped = TracerProvider(resource=resource, sampler=ALWAYS_OFF).get_tracer("b")
    recorded = TracerProvider(resource=resource, sampler=ALWAYS_ON).get_tracer("b")

    def span(tracer: Any) -> Callable[[], None]:
        def start_and_end() -> None:
            tracer.start_span("GET /v1/notes/{note_id}", kind=SpanKind.SERVER).end()

        return start_and_end

    access = logging.getLogger("bench.uvicorn.access")
    access.propagate = False
    log.setFormatter(json_formatter("bench"))
    log.addFilter(TraceContext())
    access.addHandler(log)
    access.setLevel(logging.INFO)
    line = ('%s - "%s %s HTTP/%s" %d', "127.0.0.1:50000", "GET", "/v1/notes/x", "1.1", 200)
    counted = HttpMetrics(DURATION_BUCKETS_S)
    key = ("GET", 200, "/v1/notes/{note_id}", "1.1", "http", "")

    def count() -> None:
        counted.started("GET", "http")
        counted.finished("GET", "http", key, 0.0004)

    registry = CollectorRegistry(auto_describe=False)
    histogram = Histogram(
        "http_server_request_duration_seconds",
        "Duration of HTTP server requests.",
        ["error_type", "http_request_method", "http_response_status_code", "http_route",
         "network_protocol_version", "url_scheme"],
        buckets=DURATION_BUCKETS_S,
        registry=registry,
    )  # fmt: skip
    active = Gauge(
        "http_server_active_requests",
        "Number of active HTTP server requests.",
        ["http_request_method", "url_scheme"],
        registry=registry,
    )

    def count_with_client() -> None:
        in_flight = active.labels("GET", "http")
        in_flight.inc()
        in_flight.dec()
        histogram.labels("", "GET", "200", "/v1/notes/{note_id}", "1.1", "http").observe(0.0004)

    scope: Scope = {
        "method": "GET",
        "path": "/v1/notes/x",
        "query_string": b"",
        "http_version": "1.1",
        "client": ("127.0.0.1", 50000),
    }
    span_of_request = dropped.start_span("GET", kind=SpanKind.SERVER)
    return {
        "record": _sync(lambda: duration.record(0.0004, DURATION_ATTRIBUTES)),
        "add": _sync(lambda: in_flight.add(1, IN_FLIGHT_ATTRIBUTES)),
        "count": _sync(count),
        "count-prometheus-client": _sync(count_with_client),
        "span-dropped": _sync(span(dropped)),
        "span-recorded": _sync(span(recorded)),
        "access-log-stock": _sync(lambda: access.info(*line)),
        "access-log": _sync(
            lambda: node_access.write(scope, 200, "/v1/notes/{note_id}", 0.0004, span_of_request)
        ),
        "access-log-json-dumps": _sync(
            lambda: dumps_access.write(scope, 200, "/v1/notes/{note_id}", 0.0004, span_of_request)
        ),
    }


class JsonDumpsAccessLog(AccessLog):
    """AccessLog with each line made by json.dumps of a dict: the reference for its f-string."""

    def __init__(self, node_id: str, stream: Any) -> None:
        super().__init__(node_id, stream)
        self.fields = json.loads("{" + self.node + "}")

    def _line(self, access: Any) -> str:
        at, client, method, path, version, status, route, seconds, ids = access
        line: dict[str, Any] = {
            "level": "INFO",
            "logger": self.LOGGER,
            "message": f'{client} - "{method} {path} HTTP/{version}" {status}',
            **self.fields,
            "client": client,
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        if ids:
            line["trace_id"], line["span_id"] = format(ids[0], "032x"), format(ids[1], "016x")
        line["time"] = datetime.fromtimestamp(at, UTC).isoformat()
        return json.dumps(line) + "\n"


async def _timed(case: Case, calls: int) -> float:
    """CPU µs of the calling thread per call (the event loop's: every case runs on it)."""
    started = time.thread_time()
    for _ in range(calls):
        await case()
    return (time.thread_time() - started) / calls * 1e6


async def _measure(args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    settings: dict[str, Any] = {
        "environment": "production",
        "cursor_secret": "bench-cursor-secret-0123456789",
        "node_id": "bench",
        "drain_delay_s": 0,
    }
    apps: dict[str, FastAPI] = {}
    for name, enabled in ((READ, False), (OURS, True), (NO_SPAN, True), (FASTAPI, True)):
        data = work / name
        data.mkdir()
        node = Settings(data_dir=data, telemetry_enabled=enabled, access_log=False, **settings)
        await migrate.migrate(node.effective_database_url, domains.schema())
        stack = {FASTAPI: "fastapi", OURS: "spans"}.get(name)
        apps[name] = create_app(node) if stack is None else stock_node.build_app(node, stack)
    cases: dict[str, Case] = {}
    async with contextlib.AsyncExitStack() as running:
        for name, app in apps.items():
            state = await running.enter_async_context(app.router.lifespan_context(app))
            cases[name] = await _read_case(app, dict(state or {}))
        log = logging.StreamHandler((work / "access.log").open("w"))
        access_file = (work / "access-node.log").open("w")
        running.callback(access_file.close)
        node_access = AccessLog("bench", access_file)
        running.callback(node_access.flush)  # before the file closes (callbacks run last first)
        dumps_access = JsonDumpsAccessLog("bench", access_file)
        running.callback(dumps_access.flush)
        cases.update(_sdk_cases(log, node_access, dumps_access))
        for case in cases.values():  # warm-up: first calls build caches
            await _timed(case, max(1, args.calls // 10))
        times: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(await _timed(cases[name], args.calls))
        log.close()
        log.stream.close()
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, values in times.items():
        shares = [v / r for v, r in zip(values, times[READ], strict=True)]
        summary[name] = {
            "us_per_call_median": round(statistics.median(values), 2),
            "us_per_call_range": [round(min(values), 2), round(max(values), 2)],
            "share_of_read_median": round(statistics.median(shares), 4),
        }
    return summary


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="cattle-otel-cost-"))
    try:
        times = asyncio.run(_measure(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = [r + 2 * a for r, a in zip(times["record"], times["add"], strict=True)]
    metric_share = [f / r for f, r in zip(floor, times[READ], strict=True)]
    extra = {
        name: [(t - r) for t, r in zip(times[name], times[READ], strict=True)]
        for name in (OURS, NO_SPAN, FASTAPI)
    }
    return reports.stamped(
        reports.command_line("loadtests.benchmarks.otel_cost", argv or []),
        {
            "setup": {"rounds": args.rounds, "calls": args.calls},
            "rounds": times,
            "summary": summarize(times),
            # What telemetry adds to the read, per round: cattle's and FastAPI's.
            "telemetry_added_us_median": {
                name: round(statistics.median(values), 2) for name, values in extra.items()
            },
            "metrics_floor": {
                "us_median": round(statistics.median(floor), 2),
                "share_of_read_median": round(statistics.median(metric_share), 4),
                "share_of_read_range": [round(min(metric_share), 4), round(max(metric_share), 4)],
            },
        },
    )


def markdown(report: dict[str, Any]) -> str:
    s, floor, setup = report["summary"], report["metrics_floor"], report["setup"]
    added = report["telemetry_added_us_median"]
    read = s[READ]["us_per_call_median"]
    lines = [
        "# What the OpenTelemetry SDK's per-request calls cost",
        "",
        reports.measured(report),
        "",
        f"**cattle's middleware adds {added[OURS]:.1f} µs to a cached read of {read:.0f} µs; "
        f"FastAPI's own telemetry adds {added[FASTAPI]:.1f} µs** (medians over rounds of "
        "each read's cost less the plain read's in the same round). Making no span, as it "
        f"does with no trace export configured, cattle's middleware adds {added[NO_SPAN]:.1f} µs.",
        "",
        f"Through the SDK's instruments, a request's duration record and its two in-flight "
        f"adds alone cost "
        f"{floor['us_median']:.1f} µs, {100 * floor['share_of_read_median']:.1f}% of a cached "
        f"read's {read:.0f} µs with telemetry off (per round "
        f"{100 * floor['share_of_read_range'][0]:.1f}% to "
        f"{100 * floor['share_of_read_range'][1]:.1f}%); cattle's own count (`count`) "
        "does the same work.",
        "",
        "| case | µs per call (median) | range over rounds | share of the read (median) |",
        "| --- | ---: | --- | ---: |",
    ]
    for name, row in s.items():
        low, high = row["us_per_call_range"]
        lines.append(
            f"| `{name}` | {row['us_per_call_median']:.2f} | {low:.2f}-{high:.2f} | "
            f"{100 * row['share_of_read_median']:.1f}% |"
        )
    lines += [
        "",
        *reports.how_measured(report),
        f"- {setup['rounds']} rounds of {setup['calls']} calls per case, in one process, the "
        "order rotated each round; CPU time of the calling thread (the event loop's), per call.",
        f"- `{READ}`, `{OURS}` and `{FASTAPI}` call the whole app in-process, as uvicorn would "
        "hand a request over, for one note held in the node's cache (embedded SQLite), access "
        f"log off; `{OURS}` has cattle's middleware (service/telemetry/http.py) making a span "
        f"per request, `{FASTAPI}` FastAPI's own spans and HTTP metrics in its place "
        "(both `loadtests.benchmarks.stock_node`), both on the node's default sampler (10% of "
        "new traces recorded, none exported); "
        f"`{NO_SPAN}` is the node as it runs with no trace export configured: cattle's "
        "middleware making no span (its HTTP metrics and timing only).",
        "- `record`, `add` and the spans are single SDK calls on providers built as the node "
        "builds its own; `count` is the node's own count of one request, "
        "`count-prometheus-client` the same with prometheus_client's Histogram and Gauge; "
        "`access-log-stock` "
        "is one access line as uvicorn writes it, through the logging module, the node's "
        "trace filter and python-json-logger; `access-log` is the node's own access line "
        "(service.telemetry.http.AccessLog), `access-log-json-dumps` the same line made by "
        "json.dumps of a dict and datetime.isoformat (how AccessLog formatted it before its "
        "f-string); all to a file.",
        "- The share is each case's cost over the read's, taken within each round.",
        "",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmarks.otel_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=2000, help="calls per case and round")
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    parser.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument(
        "--no-lock", action="store_true", help="skip the machine-wide lock (smoke runs)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    return reports.run_and_print(
        "bench_otel_cost",
        args.out,
        render_only=args.render,
        measure=lambda: measure(args, argv),
        markdown=markdown,
        lock=not args.no_lock,
    )


if __name__ == "__main__":
    sys.exit(main())
