"""The cache for routes: `reads(request)` reads a resource by id through the node's cache.

A route declares its read as a `RowRead` (service/db/direct.py) and hands
`reads(request).get(key, read, values, represent)` the values of its
parameters and a function that turns the row into a `Representation`; it
answers with `representation.response(...)`. ETag, 304 on a matching
If-None-Match and X-Read-Source are the same whether the database or the
cache served it, and with CATTLE_CACHE=off the same code reads the database
every time. A route that changes a resource declares `invalidations:
InvalidationsDep` and calls `invalidations.wrote(session, key)` after its
write block, before it answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from service import conditional, node
from service.cache.store import ReadCache
from service.db import consistency
from service.db.direct import RowRead
from service.db.engines import Database, consistency_token
from service.deps import CONSISTENCY_TOKEN_PARAMETER, decode_token

# X-Read-Source of a response the node's cache served.
SOURCE = "cache"


@dataclass(frozen=True, slots=True)
class Representation:
    """A resource as a read by id answers it, serialized once.

    Immutable, so every request that hits the cache may share it (an ORM
    object never outlives the session that loaded it).
    """

    version: int  # the ETag's
    body: bytes
    media_type: str = "application/json"

    def response(self, *, source: str, if_none_match: str | None = None) -> Response:
        """200 with the body, or 304 when `if_none_match` matches; ETag and
        X-Read-Source either way."""
        headers = {"ETag": conditional.etag(self.version), **consistency.headers(source=source)}
        if if_none_match is not None and conditional.none_match(if_none_match, self.version):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


Represent = Callable[[dict[str, Any]], Representation]


class CachedReads:
    """One request's reads by id."""

    def __init__(self, db: Database, cache: ReadCache | None, min_lsn: int | None) -> None:
        self.db = db
        self.cache = cache
        self.min_lsn = min_lsn

    async def get(
        self, key: str, read: RowRead, values: Mapping[str, Any], represent: Represent
    ) -> tuple[Representation | None, str]:
        """The resource under `key` and who served it ("cache", or the database source).

        A hit needs an entry stamped at or after the request's consistency
        token; a miss runs `read` like an uncached read (a replica that has
        the token's write, else the primary) and stores what `represent`
        made of the row, stamped with the source's position as of the read.
        No row is never cached.
        """
        if self.cache is None:
            row, source, _ = await self.db.fetch_row(read, values, min_lsn=self.min_lsn)
            return (None if row is None else represent(row)), source
        cached = self.cache.get(key, min_lsn=self.min_lsn)
        if cached is not None:
            assert isinstance(cached, Representation)
            return cached, SOURCE
        read_at = self.cache.clock()  # before the stamp: the entry's TTL starts here
        row, source, stamp = await self.db.fetch_row(
            read, values, min_lsn=self.min_lsn, stamped=True
        )
        if row is None:
            return None, source
        found = represent(row)
        self.cache.fill(key, found, stamp=stamp, read_at=read_at)
        return found, source


class Invalidations:
    """One write request's invalidations (a dependency of its own, so a write
    route documents no Consistency-Token request header)."""

    def __init__(self, cache: ReadCache | None) -> None:
        self.cache = cache

    def wrote(self, session: AsyncSession, *keys: str) -> None:
        """The write of `session` (committed) changed `keys`: invalidate them on
        this node now, and hand them on for the other nodes."""
        if self.cache is None:
            return
        token = consistency_token(session)
        self.cache.wrote(keys, None if token is None else consistency.decode(token))


def reads(request: Request) -> CachedReads:
    """This request's reads by id: the node's database and cache, and the
    position its Consistency-Token asks for (400 if malformed).

    A plain call, not a dependency, and the header read by hand: FastAPI's
    cost per request grows with every dependency and header parameter it
    resolves, and this is the hot read (docs/results/route-cost.md). A route
    that calls it declares the header with `openapi_extra=READS_OPENAPI`.
    """
    token = request.headers.get(consistency.HEADER)
    return CachedReads(node.database(request), node.cache(request), decode_token(token))


# What a route calling `reads` adds to its OpenAPI operation (the
# Consistency-Token request header it reads); a route with parameters of
# its own read by hand appends theirs.
READS_OPENAPI: dict[str, Any] = {"parameters": [CONSISTENCY_TOKEN_PARAMETER]}


async def invalidations(request: Request) -> Invalidations:
    return Invalidations(node.cache(request))


InvalidationsDep = Annotated[Invalidations, Depends(invalidations)]
