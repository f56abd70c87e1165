"""A node that makes a span per request, by cattle's middleware or by a stock part.

    STOCK_TELEMETRY=fastapi python -m loadtests.benchmarks.stock_node
    STOCK_TELEMETRY=asgi python -m loadtests.benchmarks.stock_node

Each serves like `python -m service serve`, but with a span processor that
does nothing: a node with no trace export makes no spans, and these rows
measure what making them costs, and what the stock parts cost making them.

The telemetry benchmark's rows, with the same providers and probe exclusions:

  spans    cattle's own middleware (service/telemetry/http.py), making spans
  fastapi  FastAPI's own OpenTelemetry support (`FastAPI(telemetry=...)`),
           what cattle used before its own middleware
  asgi     opentelemetry-instrumentation-asgi's OpenTelemetryMiddleware,
           what cattle used before that
  access   cattle's middleware for spans and metrics, but the access log is
           uvicorn's, through the logging module and python-json-logger (the
           node's log format), what cattle used before its own access line

The spans are sampled as the node samples (10% of new traces recorded) and
go nowhere. Everything else (the cache, /metrics, the SQL spans) is the
node's own.
"""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from fastapi.telemetry._asgi import NativeTelemetry
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import SpanProcessor

from service.app import create_app
from service.config import Settings
from service.server import serve
from service.telemetry.http import QUIET_PATHS, HttpTelemetry, is_quiet

STACKS = ("spans", "fastapi", "asgi", "access")


def build_app(settings: Settings, stack: str) -> FastAPI:
    """cattle's app, its per-request telemetry by the stock `stack` instead of its own."""
    if stack not in STACKS:
        raise SystemExit(f"STOCK_TELEMETRY={stack!r}: say one of {', '.join(STACKS)}")
    # The stable HTTP conventions (read once per process by the instrumentation).
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    nowhere = [SpanProcessor()]  # the SDK's base processor: receives spans, does nothing
    if stack == "access":
        # No access line of the node's own; uvicorn writes its own (see main).
        return create_app(
            settings.model_copy(update={"access_log": False}), span_processors=nowhere
        )
    app = create_app(settings, span_processors=nowhere)
    if stack == "spans":
        return app
    app.user_middleware = [m for m in app.user_middleware if m.cls is not HttpTelemetry]  # type: ignore[comparison-overlap]
    telemetry = app.state.telemetry
    if stack == "asgi":
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
    # FastAPI reads its telemetry configuration when the app is constructed;
    # create_app turned it off, so it is set again here (private attributes:
    # this module only measures it).
    config: TelemetryConfig = {
        **app._telemetry,
        "tracer_provider": telemetry.tracer_provider,
        "meter_provider": telemetry.meter_provider,
        "tracing": True,
        "metrics": True,
        "logs": False,
        "operation_spans": False,
        "exclude": lambda scope: is_quiet(str(scope.get("path", "/"))),
    }
    app._telemetry = config
    app._native_telemetry = NativeTelemetry(config)
    return app


class _UvicornAccessLog(uvicorn.Config):
    """uvicorn's configuration with its own access log on (the node turns it off)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["access_log"] = True
        super().__init__(*args, **kwargs)


def main() -> None:
    settings = Settings()
    stack = os.environ.get("STOCK_TELEMETRY", "fastapi")
    if stack == "access":
        # service.server builds its uvicorn.Config at serve(): this one, here.
        uvicorn.Config = _UvicornAccessLog  # type: ignore[misc]
    serve(build_app(settings, stack), settings)


if __name__ == "__main__":
    main()
