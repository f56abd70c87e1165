"""RFC 9457 problem details: the one shape every error of the service takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPMethod, HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import NAME

PROBLEM_JSON = "application/problem+json"


def problem_type(slug: str) -> str:
    """The `type` URI of one kind of problem; documented in docs/api.md."""
    return f"urn:{NAME}:problem:{slug}"


# For a route's `responses=`: how a problem of each status is documented in
# OpenAPI, so the description lists every status and content type a client
# can meet. Statuses a proxy or the server answers (413, 431, 429) are
# listed too: a client sees them on these routes all the same.
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "A URN naming the kind of problem"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "What went wrong, and what to do"},
        "instance": {"type": "string"},
    },
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}
}
_WHEN = {
    400: "Malformed request: JSON, cursor, entity tag or Consistency-Token",
    404: "No such resource",
    409: "The same Idempotency-Key is still in flight",
    412: "If-Match does not match the current ETag",
    413: "Request body too large",
    415: "The body is not declared application/json",
    422: "Request validation failed (or an Idempotency-Key reused with another body)",
    428: "If-Match is required",
    429: "Too many requests from this client",
    431: "Request header fields too large",
    503: "The database is unavailable or the node is leaving; retry",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these statuses, each application/problem+json."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _WHEN.get(status, HTTPStatus(status).phrase),
            "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}},
        }
        if status in (409, 503):
            entry["headers"] = {
                name: {**spec, "required": True} for name, spec in _RETRY_AFTER.items()
            }
        elif status == 429:
            entry["headers"] = _RETRY_AFTER
        documented[status] = entry
    return documented


class Problem(Exception):
    """Raise anywhere in request handling to answer with problem+json."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = problem_type(slug) if slug else "about:blank"
        self.title = title or HTTPStatus(status).phrase
        self.headers = dict(headers or {})
        self.extensions = extensions


def problem_body(
    status: int, detail: str, *, type_: str = "about:blank", title: str | None = None, **ext: Any
) -> dict[str, Any]:
    return {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **ext,
    }


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    body = problem_body(
        problem.status,
        problem.detail,
        type_=problem.type,
        title=problem.title,
        **problem.extensions,
    )
    if request is not None:
        body["instance"] = request.url.path
    return JSONResponse(
        jsonable_encoder(body),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


def _json_pointer(loc: Sequence[Any]) -> str:
    # ("body", "title") -> "#/title": the pointer into the document the client sent.
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in loc[1:]]
    return "#/" + "/".join(parts)


def malformed_json(reason: str) -> Problem:
    return Problem(400, f"the request body is not valid JSON: {reason}", slug="malformed-json")


def validation_problem(exc: RequestValidationError) -> Problem:
    errors = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            # The parser's own message names the line, column and character
            # offset ("Expecting value: line 1 column 11 (char 10)").
            cause = exc.__cause__
            reason = str(cause) if cause else (error.get("ctx") or {}).get("error", "invalid")
            return malformed_json(reason)
        if error.get("type") == "missing" and loc == ("body",):
            return malformed_json("the body is empty; send a JSON object")
        where = loc[0] if loc else "body"
        entry: dict[str, Any] = {"detail": error.get("msg", "invalid"), "location": where}
        if where == "body":
            entry["pointer"] = _json_pointer(loc)
        else:
            entry["name"] = ".".join(str(p) for p in loc[1:])
        errors.append(entry)
    summary = "; ".join(
        f"{e.get('pointer') or e.get('name') or e['location']}: {e['detail']}" for e in errors
    )
    return Problem(
        422,
        f"the request is invalid: {summary}" if summary else "the request is invalid",
        slug="validation",
        title="Request validation failed",
        errors=errors,
    )


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path accepts (RFC 9110 section 15.5.6).

    Starlette's 405 names the methods of the first route whose path matched;
    a path served by several routes (GET, PATCH and DELETE apart) has them
    all. Each method is tried against the routes the way routing would.
    """
    allowed = [
        method.value
        for method in HTTPMethod
        if any(
            route.matches({**request.scope, "method": method.value})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def install(app: FastAPI) -> None:
    """Route every error FastAPI or Starlette raises through problem+json."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no resource at {request.url.path}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request)
            detail = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
            return problem_response(
                Problem(405, detail, headers={**(exc.headers or {}), "Allow": allowed}), request
            )
        elif exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
            # FastAPI answers a body its parser refused with a bare "There was
            # an error parsing the body"; the parser's reason is the cause.
            return problem_response(malformed_json(str(exc.__cause__)), request)
        return problem_response(Problem(exc.status_code, detail, headers=exc.headers), request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(validation_problem(exc), request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
