"""Request dependencies, declared once as Annotated aliases for short route signatures."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import pydantic_core
from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute

from service import node
from service.config import Settings
from service.db import consistency
from service.db.engines import Database
from service.problems import Problem


async def get_settings(request: Request) -> Settings:
    return node.settings(request.app)


async def get_database(request: Request) -> Database:
    return node.database(request)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]

JSON_TYPES = ("application/json", "application/merge-patch+json")


class JSONRequest(Request):
    """A request whose JSON body is read by pydantic's parser, strictly.

    Python's json module (FastAPI's default) takes UTF-16, NaN and lone
    surrogates (which neither database can store), and reports a too-deep
    or too-long number only as "There was an error parsing the body". pydantic's parser
    takes RFC 8259 JSON in UTF-8 only, and its error says what and where;
    problems.py turns that error into the 400's detail.
    """

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = pydantic_core.from_json(await self.body(), allow_inf_nan=False)
        return self._json


class JSONRoute(APIRoute):
    """The route class of a router whose bodies are JSON (`route_class=JSONRoute`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            return await handle(JSONRequest(request.scope, request.receive))

        return handler


async def require_json(
    # Not a parameter in OpenAPI: the request body's content types say it.
    content_type: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """415 unless the body is declared JSON: never guess at a body's format."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in JSON_TYPES:
        shown = repr(content_type) if content_type else "none"
        raise Problem(
            415,
            f"send the body as application/json (Content-Type was {shown})",
            slug="unsupported-media-type",
        )


_READ_AT_LEAST = "From a write response: read at least what that write left behind."

# The request header of a write's consistency token, declared once.
ConsistencyTokenHeader = Annotated[
    str | None,
    Header(
        alias=consistency.HEADER,
        description=_READ_AT_LEAST,
        # Documented, not enforced here: a token of another shape gets
        # the 400 problem below rather than a generic 422.
        json_schema_extra={"type": "string", "pattern": consistency.TOKEN_PATTERN},
    ),
]


def header_parameter(name: str, description: str, pattern: str) -> dict[str, Any]:
    """An optional request header in OpenAPI, for a route that reads it by hand.

    A header FastAPI parses costs every request CPU (measured in
    docs/results/route-cost.md); the hot read takes its headers from
    `request.headers` and declares them with `openapi_extra={"parameters":
    [...]}`, so the description and schemathesis see what they saw before.
    """
    title = "-".join(word.capitalize() for word in name.split("-"))
    schema = {"type": "string", "pattern": pattern, "title": title, "description": description}
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }


CONSISTENCY_TOKEN_PARAMETER = header_parameter(
    consistency.HEADER, _READ_AT_LEAST, consistency.TOKEN_PATTERN
)


def decode_token(token: str | None) -> int | None:
    """The position a consistency token asks for (None: none sent); 400 if malformed."""
    if token is None:
        return None
    try:
        return consistency.decode(token)
    except consistency.InvalidToken as exc:
        raise Problem(400, str(exc), slug="invalid-consistency-token") from None


async def min_lsn(token: ConsistencyTokenHeader = None) -> int | None:
    return decode_token(token)


MinLsnDep = Annotated[int | None, Depends(min_lsn)]
