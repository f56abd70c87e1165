"""Per-request telemetry in one pure-ASGI pass: server span, metrics, access log.

One middleware instead of the stock OTel ASGI/FastAPI ones: those record five
instruments and collect a dozen attributes per request whether or not it is
sampled, and the FastAPI one matches every request against the routes a
second time to learn its route. Here the route template comes from the scope
the router already filled in, attributes are only gathered for spans that
record, and the rest (a histogram measurement, an access-log line) is left
as one tuple for service.telemetry.handwritten.requests to record in a batch.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter, time
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.telemetry.handwritten.metrics import UNMATCHED_ROUTE
from service.telemetry.handwritten.propagation import extract_from_scope
from service.telemetry.handwritten.requests import CompletedRequest

if TYPE_CHECKING:
    from service.telemetry.handwritten.core import Telemetry

log = logging.getLogger("service.telemetry")

# Probes and scrapes arrive every second or so from several proxies: traced,
# they would be most of the spans a node exports and say nothing. They are
# still counted in the metrics, and logged when they fail.
QUIET_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/startupz", "/healthz"})

_REPLAY_HEADER = b"idempotent-replayed"


def _is_quiet(path: str) -> bool:
    return path in QUIET_PATHS or path.startswith("/readyz/")


def route_template(scope: Scope) -> str:
    """The matched route's template (/v1/notes/{note_id}), never the raw path."""
    path_format = getattr(scope.get("route"), "path_format", None)
    if not path_format:
        return UNMATCHED_ROUTE
    return f"{scope.get('root_path', '')}{path_format}"


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, *, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        telemetry = self.telemetry
        if scope["type"] != "http" or not telemetry.started:
            await self.app(scope, receive, send)
            return

        start = perf_counter()
        method: str = scope["method"]
        quiet = _is_quiet(scope["path"])
        tracer = telemetry.server_tracer
        span: trace.Span | None = None
        token: object = None
        if tracer is not None and not quiet:
            parent = extract_from_scope(scope, telemetry.propagation_headers)
            span = tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
            if span.is_recording():
                _set_request_attributes(span, scope)
            # Current for the whole request: SQL spans become its children and
            # log lines carry its ids.
            token = otel_context.attach(trace.set_span_in_context(span, parent))

        status = 0
        replayed = False
        check_replay = method == "POST"

        async def send_observed(message: Message) -> None:
            nonlocal status, replayed
            if message["type"] == "http.response.start":
                status = message["status"]
                if check_replay:
                    replayed = any(name == _REPLAY_HEADER for name, _ in message.get("headers", ()))
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_observed)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not status:
                # Nothing was sent: the client went away (cancelled), or the
                # error escaped every handler.
                status = 499 if isinstance(error, asyncio.CancelledError) else 500
            try:
                self._finish(scope, status, perf_counter() - start, span, error, replayed, quiet)
            except Exception:  # telemetry must never turn a served request into an error
                log.exception("recording telemetry for a request failed")
            if token is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
            if span is not None:
                span.end()

    def _finish(
        self,
        scope: Scope,
        status: int,
        duration_s: float,
        span: trace.Span | None,
        error: BaseException | None,
        replayed: bool,
        quiet: bool,
    ) -> None:
        method: str = scope["method"]
        route = route_template(scope)
        trace_id = span_id = 0
        if span is not None:
            if span.is_recording():
                _set_response_attributes(span, method, route, status, error)
            context = span.get_span_context()
            trace_id, span_id = context.trace_id, context.span_id
        client = scope.get("client")
        # Metrics and the access log take it from here, a batch at a time.
        self.telemetry.requests.add(
            CompletedRequest(
                time(),
                method,
                scope["path"],
                route,
                status,
                duration_s,
                client[0] if client else None,
                trace_id,
                span_id,
                replayed,
                status >= 500 or not quiet,
            )
        )


def _set_response_attributes(
    span: trace.Span, method: str, route: str, status: int, error: BaseException | None
) -> None:
    span.set_attribute("http.response.status_code", status)
    if route != UNMATCHED_ROUTE:
        span.set_attribute("http.route", route)
        span.update_name(f"{method} {route}")
    if status >= 500:
        span.set_attribute("error.type", type(error).__qualname__ if error else str(status))
        span.set_status(Status(StatusCode.ERROR))
        if error is not None and not isinstance(error, asyncio.CancelledError):
            span.record_exception(error)


def _set_request_attributes(span: trace.Span, scope: Scope) -> None:
    """Request attributes of the HTTP semantic conventions (recorded spans only)."""
    attributes: dict[str, Any] = {
        "http.request.method": scope["method"],
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if scope.get("query_string"):
        attributes["url.query"] = scope["query_string"].decode("latin-1")
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    server = scope.get("server")
    if server and server[1] is not None:
        attributes["server.port"] = server[1]
    for name, value in scope["headers"]:
        if name == b"host":
            attributes["server.address"] = _host_without_port(value.decode("latin-1"))
        elif name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
    span.set_attributes(attributes)


def _host_without_port(host: str) -> str:
    if host.startswith("["):  # [IPv6]:port
        return host[1:].partition("]")[0]
    return host.partition(":")[0]
