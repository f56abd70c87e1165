"""The app factory: `create_app(settings)` builds one node's ASGI application."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace import SpanProcessor
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

import service
from service import domains, node
from service.config import Settings
from service.db.errors import is_unavailable
from service.health import runtime as health
from service.health.lifecycle import State
from service.lifespan import lifespan
from service.middleware import EdgeMiddleware
from service.problems import Problem, install, problem_response
from service.telemetry import Telemetry
from service.telemetry import install as install_telemetry


def create_app(
    settings: Settings | None = None,
    *,
    domains_served: tuple[str, ...] = domains.DOMAINS,
    span_processors: Sequence[SpanProcessor] = (),
) -> FastAPI:
    """One node's app, serving `domains_served` (all of service/domains.py by default).

    `span_processors` receive the node's spans besides OTLP export (if the
    OTEL_* variables configure it); with neither, the node makes no spans.
    """
    settings = settings or Settings()
    telemetry = Telemetry(settings, span_processors)
    app = FastAPI(
        title=service.NAME,
        version=service.__version__,
        summary="A stateless API built to run as many identical, disposable nodes.",
        lifespan=lifespan,
        # Starlette's trailing-slash redirect builds its Location from the
        # Host header, which a client controls: an unknown path is a 404.
        redirect_slashes=False,
        # Spans and metrics per request are cattle's own (service.telemetry.http).
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    node.hold(app, settings=settings)
    # The domains' routes first: FastAPI tries routes in order, each at a
    # cost, and a request is far more often the domain's than a probe
    # (docs/results/route-cost.md). FastAPI's own (the OpenAPI document and
    # the docs pages) it added at construction; they go last.
    fastapi_own = list(app.router.routes)
    app.router.routes.clear()
    for router in domains.routers(domains_served):
        app.include_router(router)
    # Lifecycle, in-flight counter, drain controller, probe and admin routes.
    health.install(app, settings)
    install(app)
    _install_database_errors(app)
    app.add_middleware(
        EdgeMiddleware,
        node_id=settings.node_id,
        max_body_bytes=settings.max_body_bytes,
        close_connections=health.leaving(app),
    )
    # The lifecycle as a metric: health owns the state, telemetry reports it.
    lifecycle = node.lifecycle(app)
    telemetry.observe_lifecycle([state.value for state in State], lambda: lifecycle.state.value)
    install_telemetry(app, telemetry)
    _describe_parameters_as_sent(app)
    app.router.routes.extend(fastapi_own)
    return app


def _describe_parameters_as_sent(app: FastAPI) -> None:
    """Optional parameters in OpenAPI without FastAPI's `null` branch.

    FastAPI documents `str | None = None` as `anyOf: [string, null]`. On the
    wire a header or query value is always a string and absence is said by
    `required: false`, so the null branch invites clients (and fuzzers) to
    send the literal text "null", which the pattern in the string branch
    would have excluded. The schema becomes the string branch alone.
    """

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        schema = generate()  # FastAPI caches it in app.openapi_schema
        if first:
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    for parameter in operation.get("parameters", []):
                        parameter["schema"] = _without_null(parameter.get("schema", {}))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) != 1 or len(branches) == len(schema.get("anyOf", [])):
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**rest, **branches[0]}


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _install_database_errors(app: FastAPI) -> None:
    """A database that cannot be reached is the node's problem, not the client's.

    503 tells proxies and clients the work was not done and may be retried
    elsewhere; a broken query remains a 500 (handled at the edge).
    """

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        if not is_unavailable(exc):
            raise exc
        outcome = (
            "nothing was changed: retry it"
            if request.method in _SAFE_METHODS
            else "a write may or may not have been applied: retry with the same "
            "Idempotency-Key to be safe"
        )
        return problem_response(
            Problem(
                503,
                f"the database is unavailable right now; the request was not completed ({outcome})",
                slug="database-unavailable",
                headers={"Retry-After": "1"},
            ),
            request,
        )

    app.add_exception_handler(DBAPIError, unavailable)
    app.add_exception_handler(PoolTimeout, unavailable)
    app.add_exception_handler(ConnectionError, unavailable)
