"""A node whose HTTP telemetry is `opentelemetry-instrumentation-asgi`'s middleware.

    python -m loadtests.benchmarks.asgi_node   # serves like `python -m service serve`

The telemetry benchmark's `asgi-middleware` configuration: the middleware
cattle used before FastAPI's own OpenTelemetry support, given the same
providers and probe exclusions, so the two are measured side by side. With
the middleware in the stack, FastAPI steps its own tracing and metrics
aside (it looks for this middleware), so requests are measured once.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

from service.app import create_app
from service.config import Settings
from service.server import serve
from service.telemetry.http import QUIET_PATHS


def build_app(settings: Settings) -> FastAPI:
    """cattle's app, its per-request telemetry by the ASGI middleware."""
    # The stable HTTP conventions, as FastAPI records them (read once per process).
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    app = create_app(settings)
    telemetry = app.state.telemetry
    app.add_middleware(
        OpenTelemetryMiddleware,
        # Matched against the full URL (scheme://host/path): anchored after the host.
        excluded_urls=",".join(f"^[^/]*//[^/]*{path}(/.*)?$" for path in sorted(QUIET_PATHS)),
        # One server span per request, not one more per ASGI message.
        exclude_spans=["receive", "send"],
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    return app


def main() -> None:
    settings = Settings()
    serve(build_app(settings), settings)


if __name__ == "__main__":
    main()
