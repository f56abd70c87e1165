"""Request dependencies, declared once as Annotated aliases for short route signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

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


async def require_json(content_type: Annotated[str | None, Header()] = None) -> None:
    """415 unless the body is declared JSON: never guess at a body's format."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in JSON_TYPES:
        shown = repr(content_type) if content_type else "none"
        raise Problem(
            415,
            f"send the body as application/json (Content-Type was {shown})",
            slug="unsupported-media-type",
        )


async def min_lsn(
    token: Annotated[
        str | None,
        Header(
            alias=consistency.HEADER,
            description="From a write response: read at least what that write left behind.",
        ),
    ] = None,
) -> int | None:
    if token is None:
        return None
    try:
        return consistency.decode(token)
    except consistency.InvalidToken as exc:
        raise Problem(400, str(exc), slug="invalid-consistency-token") from None


MinLsnDep = Annotated[int | None, Depends(min_lsn)]
