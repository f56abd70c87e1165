"""Probe routes: /livez, /startupz, /readyz[/<check>], /healthz.

Every probe answers from memory (lifecycle state and the checker's cached
results); none touches the database, so proxies may probe as often as they
like. Responses carry `Cache-Control: no-store`: a cached "ready" is a lie.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import service
from service import node
from service.health.checks import HealthChecker, Status
from service.health.lifecycle import Lifecycle, State
from service.problems import Problem, problem_responses

router = APIRouter(tags=["health"])
Endpoint = Callable[..., Awaitable[Response]]

HEALTH_JSON = "application/health+json"
NO_STORE = {"Cache-Control": "no-store"}

# OpenAPI: what the probes answer (every answer is `no-store`).
_NO_STORE_HEADER = {
    "Cache-Control": {
        "description": "Always `no-store`: a cached probe answer is stale by design",
        "required": True,
        "schema": {"type": "string", "enum": ["no-store"]},
    }
}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
# The node bus as this node sees it (absent with CATTLE_BUS=off). Peers are
# advisory: their states never change this node's status.
_BUS_DOCUMENT = {
    "type": "object",
    "description": "The node bus (absent when it is off): this node's endpoint and its peers",
    "required": ["endpoint", "epoch", "peers"],
    "properties": {
        "endpoint": {"type": "string", "description": "the bound PUB endpoint, tcp://host:port"},
        "epoch": {"type": "integer", "description": "random per process start"},
        "seq": {"type": "integer", "description": "messages sent so far"},
        "connections": {
            "type": "object",
            "description": "each endpoint this node subscribes to, and its link",
            "additionalProperties": {"type": "string", "enum": ["up", "connecting", "down"]},
        },
        "peers": {
            "type": "object",
            "description": "by node id",
            "additionalProperties": {
                "type": "object",
                "required": ["state"],
                "properties": {
                    "state": {
                        "type": "string",
                        "enum": ["alive", "suspect", "dead", "draining", "left"],
                    },
                    "lifecycle": {"type": ["string", "null"]},
                    "link": {
                        "type": ["string", "null"],
                        "enum": ["up", "connecting", "down", None],
                    },
                    "silentS": {"type": "number"},
                    "losses": {"type": "integer"},
                    "endpoint": {"type": ["string", "null"]},
                },
            },
        },
    },
}
_HEALTH_DOCUMENT = {
    HEALTH_JSON: {
        "schema": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {
                "status": {"type": "string", "enum": [str(s) for s in Status]},
                "version": {"type": "string"},
                "serviceId": {"type": "string"},
                "nodeId": {"type": "string"},
                "description": {"type": "string"},
                "lifecycle": {"type": "string"},
                "checks": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": {"type": "object"}},
                },
                "bus": _BUS_DOCUMENT,
            },
        }
    }
}


class HealthJSONResponse(JSONResponse):
    """JSON under its health media type, so OpenAPI names that type alone."""

    media_type = HEALTH_JSON


def _probe_responses(
    ok: str, unavailable: str, content: dict[str, Any] = _TEXT
) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": ok, "content": content, "headers": _NO_STORE_HEADER},
        503: {"description": unavailable, "content": content, "headers": _NO_STORE_HEADER},
    }


def probe(path: str, **kwargs: Any) -> Callable[[Endpoint], Endpoint]:
    """GET (documented) and HEAD (HAProxy and `curl -I` probe with it) on one endpoint."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **kwargs)
        router.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        return endpoint

    return register


async def get_checker(request: Request) -> HealthChecker:
    checker = node.health(request)
    if checker is None:
        raise RuntimeError("no health checker: the node's lifespan has not started")
    return checker


async def get_lifecycle(request: Request) -> Lifecycle:
    return node.lifecycle(request.app)


CheckerDep = Annotated[HealthChecker, Depends(get_checker)]
LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]


def _text(body: str, status_code: int) -> PlainTextResponse:
    return PlainTextResponse(body + "\n", status_code=status_code, headers=NO_STORE)


@probe(
    "/livez",
    summary="Liveness: is the process alive?",
    response_class=PlainTextResponse,
    responses=_probe_responses("Alive: `ok`", "The health checker died: restart the node"),
)
async def livez(request: Request, lifecycle: LifecycleDep) -> Response:
    """200 while the event loop answers; no dependency is checked, and draining is alive.

    503 only when the node cannot watch itself any more (its health checker
    died), which a restart cures. A database outage never fails liveness:
    restarting every node because the database is down helps nobody.
    """
    checker = node.health(request)
    stopping = lifecycle.state in (State.stopping, State.stopped)  # the checker stops first
    if checker is not None and not checker.alive and not stopping:
        return _text("health checker stopped", 503)
    return _text("ok", 200)


@probe(
    "/startupz",
    summary="Startup: has start-up finished?",
    response_class=PlainTextResponse,
    responses=_probe_responses("Started: `ok`", "Still starting"),
)
async def startupz(lifecycle: LifecycleDep) -> Response:
    if lifecycle.state is State.starting:
        return _text("starting", 503)
    return _text("ok", 200)


@probe(
    "/readyz",
    summary="Readiness: send work here?",
    response_class=PlainTextResponse,
    responses=_probe_responses(
        "Ready: `ok`, or one line per check", "Not ready: the failing checks"
    ),
)
async def readyz(
    checker: CheckerDep,
    verbose: Annotated[str | None, Query(description="any value: one line per check")] = None,
) -> Response:
    """200 when READY or DEGRADED and the primary answered its last check; else 503.

    `?verbose` lists every check, `[+]` passing or warning, `[-]` failing.
    """
    ready, failing = checker.readiness()
    status_code = 200 if ready else 503
    if verbose is None:
        if ready:
            return _text("ok", 200)
        return _text("; ".join(f"{r.name}: {r.output}" for r in failing), 503)
    lines = [r.line() for r in checker.snapshot().values() if r.name != "uptime"]
    lines.append("readyz check passed" if ready else "readyz check failed")
    return _text("\n".join(lines), status_code)


@probe(
    "/readyz/{check}",
    summary="One readiness check by name",
    response_class=PlainTextResponse,
    responses={
        **_probe_responses("The check passes or warns", "The check fails"),
        **problem_responses(404),
    },
)
async def readyz_check(check: str, checker: CheckerDep) -> Response:
    """200 when the check passes or warns, 503 when it fails; 404 for an unknown name."""
    snapshot = checker.snapshot()
    result = snapshot.get(check)
    if result is None:
        raise Problem(
            404,
            f"no check named {check!r}; checks: {', '.join(snapshot)}",
            slug="not-found",
        )
    return _text(result.line(), 503 if result.status is Status.fail else 200)


@probe(
    "/healthz",
    summary="Every check with observed values (application/health+json)",
    response_class=HealthJSONResponse,
    responses=_probe_responses(
        "Ready: `pass`, or `warn` when a check warns",
        "Not ready: `fail`",
        _HEALTH_DOCUMENT,
    ),
)
async def healthz(request: Request, checker: CheckerDep, lifecycle: LifecycleDep) -> Response:
    """The draft-inadarei-api-health-check document; status codes as /readyz."""
    ready, _ = checker.readiness()
    snapshot = checker.snapshot()
    if not ready:
        status = Status.fail
    elif any(r.status is not Status.ok for r in snapshot.values()):
        status = Status.warn
    else:
        status = Status.ok
    node_id = node.settings(request.app).node_id
    body: dict[str, Any] = {
        "status": str(status),
        "version": service.__version__,
        "serviceId": node_id,
        "nodeId": node_id,
        "description": f"{service.NAME} node {node_id}",
        "lifecycle": str(lifecycle.state),
        "checks": {r.key: [r.to_health_json()] for r in snapshot.values()},
    }
    bus = node.bus(request)
    if bus is not None:
        body["bus"] = bus.snapshot()
    return JSONResponse(
        body, status_code=200 if ready else 503, media_type=HEALTH_JSON, headers=NO_STORE
    )
