"""RFC 9457 problem details: the one shape every error of the service takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import NAME

PROBLEM_JSON = "application/problem+json"


def problem_type(slug: str) -> str:
    """The `type` URI of one kind of problem; documented in docs/api.md."""
    return f"urn:{NAME}:problem:{slug}"


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


def validation_problem(exc: RequestValidationError) -> Problem:
    errors = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            return Problem(
                400,
                f"the request body is not valid JSON: {reason} at position {loc[-1]}",
                slug="malformed-json",
            )
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
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(Problem(exc.status_code, detail, headers=exc.headers), request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(validation_problem(exc), request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
