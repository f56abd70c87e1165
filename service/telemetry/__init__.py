"""Observability: OpenTelemetry traces and metrics, /metrics, and JSON logs.

Stock parts, configured: FastAPI's own OpenTelemetry support (http), the SDK's
providers and OTLP exporters read the standard OTEL_* variables (core,
tracing), the SQLAlchemy instrumentation (tracing), python-json-logger (logs).
What is cattle's own: providers per app, export watched and reported for
/healthz (exporting), gauges for the node's state (metrics), GET /metrics
(router).
"""

from __future__ import annotations

from fastapi import FastAPI

from service.telemetry.core import Telemetry
from service.telemetry.exporting import ExportStatus, SignalStatus
from service.telemetry.http import fastapi_telemetry
from service.telemetry.router import router

__all__ = ["ExportStatus", "SignalStatus", "Telemetry", "fastapi_telemetry", "install"]


def install(app: FastAPI, telemetry: Telemetry) -> None:
    """Serve /metrics; the app was built with `FastAPI(telemetry=fastapi_telemetry(telemetry))`."""
    app.state.telemetry = telemetry
    app.include_router(router)
