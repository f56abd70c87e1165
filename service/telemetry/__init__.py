"""Observability: OpenTelemetry traces and metrics, /metrics, and JSON logs.

Stock parts, configured: the OTel ASGI middleware (middleware), the SDK's
providers and OTLP exporters read the standard OTEL_* variables (core,
tracing), the SQLAlchemy instrumentation (tracing), python-json-logger (logs).
What is cattle's own: providers per app, export watched and reported for
/healthz (exporting), gauges for the node's state (metrics), GET /metrics
(router).
"""

from __future__ import annotations

from fastapi import FastAPI

from service.telemetry import middleware
from service.telemetry.core import Telemetry
from service.telemetry.exporting import ExportStatus, SignalStatus
from service.telemetry.router import router

__all__ = ["ExportStatus", "SignalStatus", "Telemetry", "install"]


def install(app: FastAPI, telemetry: Telemetry) -> None:
    """Serve /metrics and wrap the app in the telemetry middleware.

    Call after the other middleware is added, so this one is outermost and
    sees the final status of every response (the edge's 413s and 500s too).
    """
    app.state.telemetry = telemetry
    app.include_router(router)
    if telemetry.enabled:
        middleware.install(app, telemetry)
