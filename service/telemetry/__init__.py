"""Observability: OpenTelemetry traces and metrics, /metrics, and JSON logs.

Stock, configured: the SDK and its OTLP exporters (core, tracing), the SQLAlchemy
instrumentation (tracing), python-json-logger (logs). cattle's own: the per-request
middleware, for its cost (http), the export watch (exporting), the node's gauges (metrics),
GET /metrics (router). Which is which, and why: docs/observability.md.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.telemetry.core import Telemetry
from service.telemetry.exporting import ExportStatus, SignalStatus
from service.telemetry.http import AccessLog, HttpTelemetry
from service.telemetry.router import router

__all__ = ["ExportStatus", "SignalStatus", "Telemetry", "install"]


def install(app: FastAPI, telemetry: Telemetry) -> None:
    """Serve /metrics; trace, count and access-log every request. Call it after
    every other middleware is added: it must be the outermost, to see every
    final status (the edge's 413s and 500s too)."""
    app.state.telemetry = telemetry
    app.include_router(router)
    settings = telemetry.settings
    access = AccessLog(settings.node_id) if settings.access_log else None
    telemetry.access_log = access  # flushed when the node stops
    if telemetry.enabled or access is not None:
        app.add_middleware(
            HttpTelemetry,
            traced=telemetry.enabled,
            tracer_provider=telemetry.tracer_provider,
            metrics=telemetry.http_metrics,
            access=access,
        )
