"""The per-request server span and HTTP metrics: FastAPI's own OpenTelemetry support, configured.

FastAPI (0.165 on) traces and measures every request itself when it is given
providers: one server span named by the matched route's template, and the
stable conventions' `http.server.request.duration` and
`http.server.active_requests`, labelled with the template, never the raw
path. It wraps the whole app, error handling included, so it sees every
final status (the edge's 413s and 500s too).

What it is given: the app's own providers (never the OTel globals), and the
probe and scrape paths to leave alone. Operation spans (dependency solving,
the endpoint and serialization as children of the server span) stay off:
they would cost every request, recorded or not, and a read's SQL spans
already show where its time goes. FastAPI's own OTLP set-up stays off too:
cattle's exporters are started, watched and bounded in `core`.

Why this and not `opentelemetry-instrumentation-asgi`'s middleware, which
cattle used before: it costs less per request, measured side by side
(docs/observability.md has the figures).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi.telemetry import TelemetryConfig

if TYPE_CHECKING:
    from service.telemetry.core import Telemetry

# Probes and scrapes arrive every second or so from several proxies: traced
# and counted, they would be most of a node's spans and say nothing.
QUIET_PATHS = frozenset({"/livez", "/readyz", "/startupz", "/healthz", "/metrics"})


def is_quiet(path: str) -> bool:
    """A probe or scrape path, with or without a suffix (/readyz/primary)."""
    return "/" + path.partition("?")[0].split("/", 2)[1] in QUIET_PATHS


def _quiet_request(scope: MutableMapping[str, Any]) -> bool:
    return is_quiet(str(scope.get("path", "/")))


def fastapi_telemetry(telemetry: Telemetry) -> TelemetryConfig:
    """`FastAPI(telemetry=...)` for this app: its providers, or nothing at all."""
    if telemetry.tracer_provider is None or telemetry.meter_provider is None:
        # Off means off: not even an OTel global an operator's agent set up.
        return {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}
    return {
        "tracer_provider": telemetry.tracer_provider,
        "meter_provider": telemetry.meter_provider,
        # Logs are JSON lines on stdout (service.telemetry.logs), not OTel records.
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
        "exclude": _quiet_request,
    }
