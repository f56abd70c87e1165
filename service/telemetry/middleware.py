"""The per-request server span and HTTP metrics: the stock OTel ASGI middleware, configured.

What it is given: the app's own providers (never the OTel globals), the
probe and scrape paths to leave alone, and the matched route's template,
which names the span and labels the metrics (never the raw path).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import Span
from opentelemetry.util.http import sanitize_method

if TYPE_CHECKING:
    from service.telemetry.core import Telemetry

# Probes and scrapes arrive every second or so from several proxies: traced
# and counted, they would be most of a node's spans and say nothing.
QUIET_PATHS = ("/livez", "/readyz", "/startupz", "/healthz", "/metrics")
# Matched against the full URL (scheme://host/path), so anchored after the host.
EXCLUDED_URLS = ",".join(f"^[^/]*//[^/]*{path}(/.*)?$" for path in QUIET_PATHS)


def route_template(scope: dict[str, Any]) -> str | None:
    """The matched route's template (/v1/notes/{note_id}), which the router
    has put in the scope by the time a response starts; None if none matched."""
    path_format = getattr(scope.get("route"), "path_format", None)
    return f"{scope.get('root_path', '')}{path_format}" if path_format else None


class RoutedMiddleware(OpenTelemetryMiddleware):
    """The stock middleware, told the route once the router has found it.

    It names the span and labels the duration before the app runs, from the
    request alone; matching the routes a second time up front is what the
    FastAPI instrumentation does, and FastAPI's included routers carry no
    template to match against. So the template is added when the response
    starts, to the span and to the attributes the middleware records the
    duration with (the dict it passes here).
    """

    def _get_otel_send(  # type: ignore[no-untyped-def]
        self, server_span: Span, server_span_name: str, scope, send, duration_attrs
    ):
        otel_send = super()._get_otel_send(  # type: ignore[no-untyped-call]
            server_span, server_span_name, scope, send, duration_attrs
        )

        async def send_with_route(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                route = route_template(scope)
                if route is not None:
                    duration_attrs["http.route"] = route
                    if server_span.is_recording():
                        server_span.set_attribute("http.route", route)
                        server_span.update_name(f"{server_span_name} {route}")
            await otel_send(message)

        return send_with_route


def _method_only(scope: dict[str, Any]) -> tuple[str, dict[str, str]]:
    # The span's first name; the route is added when it is known (see above).
    method = sanitize_method(str(scope.get("method", "")).strip())
    return ("HTTP" if method == "_OTHER" else method), {}


def install(app: FastAPI, telemetry: Telemetry) -> None:
    # The stable HTTP conventions: http.server.request.duration in seconds,
    # whose attributes hold no raw path (the older ones put http.target, the
    # raw path, on the histogram: one series per note). Read once per process
    # by the instrumentation; an operator's own setting wins.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    app.add_middleware(
        RoutedMiddleware,
        excluded_urls=EXCLUDED_URLS,
        default_span_details=_method_only,
        # One server span per request, not one more per ASGI message.
        exclude_spans=["receive", "send"],
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
