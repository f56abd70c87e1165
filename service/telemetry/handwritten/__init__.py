"""The hand-written telemetry path, kept only to be measured beside the stock one.

Selected with CATTLE_TELEMETRY_IMPL=handwritten (loadtests.benchmarks.telemetry).

Observability: OpenTelemetry traces and metrics, /metrics, and JSON logs.

- core: `Telemetry`, one per app (`app.state.telemetry`): providers, exporters,
  gauges, `export_status()` for /healthz;
- tracing: resource, sampler, SQL spans; metrics: instruments and gauges;
- middleware: the per-request server span, metrics and access log;
- propagation: `inject`/`extract` of trace context for HTTP and bus messages;
- logs: the JSON log format and the logging config uvicorn also uses;
- exporting: OTLP exporters watched for failure; router: GET /metrics.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.telemetry.handwritten.core import Telemetry
from service.telemetry.handwritten.exporting import ExportStatus, SignalStatus
from service.telemetry.handwritten.middleware import TelemetryMiddleware
from service.telemetry.handwritten.propagation import extract, inject, link_from
from service.telemetry.handwritten.router import router

__all__ = [
    "ExportStatus",
    "SignalStatus",
    "Telemetry",
    "extract",
    "inject",
    "install",
    "link_from",
    "router",
]


def install(app: FastAPI, telemetry: Telemetry) -> None:
    """Serve /metrics and wrap the app in the telemetry middleware.

    Call after the other middleware is added, so this one is outermost and
    sees the final status of every response (the edge's 413s and 500s too).
    """
    app.state.telemetry = telemetry
    app.include_router(router)
    # The health package owns the lifecycle and the in-flight counter (probes
    # excluded); read at collection time, whenever they exist.
    state = app.state
    telemetry.observe_lifecycle(lambda: getattr(getattr(state, "lifecycle", None), "state", None))
    telemetry.observe_in_flight(lambda: getattr(getattr(state, "in_flight", None), "count", 0))
    if telemetry.enabled or telemetry.requests.access_log is not None:
        app.add_middleware(TelemetryMiddleware, telemetry=telemetry)
