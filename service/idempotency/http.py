"""The one entry point that makes a write route safe to retry: `IdempotentWriteDep`.

A route declares `write: IdempotentWriteDep` and hands its work, a function
of the write session that returns the response, to `write.run(work, body=...)`.
Without an `Idempotency-Key` header the work simply runs in one transaction.
With one, this module does the whole protocol of `service.idempotency.service`
(key lock, claim, replay with `Idempotent-Replayed: true`, 422 for another
body, 409 with Retry-After while in flight, lease check, shielded release), so
no domain writes it again. Either way the response leaves with the write's
Consistency-Token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from service.config import Settings
from service.db import consistency
from service.db.engines import Database, consistency_token
from service.deps import DatabaseDep, SettingsDep
from service.idempotency import service
from service.problems import Problem

REPLAYED = "Idempotent-Replayed"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes a retried write safe: printable ASCII, up to 255 characters.",
    ),
]

# For a route's `responses=`: what the key adds to its OpenAPI description.
RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "Same Idempotency-Key still in flight"},
}

# Headers a stored response does not keep: recomputed when it is replayed.
_NOT_STORED = frozenset({"content-length", consistency.HEADER.lower()})

Work = Callable[[AsyncSession], Awaitable[Response]]


class IdempotentWrite:
    """One write request, with or without its Idempotency-Key."""

    def __init__(
        self, db: Database, settings: Settings, key: str | None, *, method: str, path: str
    ) -> None:
        self.db = db
        self.settings = settings
        self.key = key
        self.method = method
        self.path = path

    async def run(self, work: Work, *, body: Any) -> Response:
        """Run `work` in one write transaction and answer with its response.

        `body` is what the request asks for (a pydantic model or plain JSON
        data): the same key with another body is refused, and comparing
        parsed bodies makes JSON formatting irrelevant.
        """
        if self.key is None:
            async with self.db.write() as session:
                response = await work(session)
            return _with_token(response, consistency_token(session))

        wait_s = self.settings.idempotency_wait_s
        # Every step runs on the lock's connection: one pooled connection per
        # request, all of it within the node's database bound.
        async with self.db.bounded(), service.key_lock(self.db, self.key, wait_s=wait_s) as lock:
            connection = lock.connection
            claimed = await self._claim(lock, body)
            if isinstance(claimed, service.StoredResponse):
                # The first response's write is committed: a token for "now" covers it.
                return _replay(claimed, await self.db.current_token(connection=connection))
            try:
                async with self.db.write(connection=connection) as session:
                    response = await work(session)
                    # In the work's transaction: the response and its effects commit together.
                    await service.complete(session, claimed, _stored(response))
            except service.LeaseLost:
                raise in_flight(self.settings.idempotency_lease_s) from None
            except BaseException as exc:
                # Shielded so a cancelled request still gives its key back.
                await lock.release(self.db, claimed, after=exc)
                raise
        return _with_token(response, consistency_token(session))

    async def _claim(
        self, lock: service.KeyLock, body: Any
    ) -> service.Lease | service.StoredResponse:
        payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
        assert self.key is not None
        try:
            return await service.claim(
                self.db,
                key=self.key,
                fingerprint=service.fingerprint(self.method, self.path, payload),
                lease_s=self.settings.idempotency_lease_s,
                ttl_s=self.settings.idempotency_ttl_s,
                holder=lock.holder,
                connection=lock.connection,
            )
        except service.KeyReused:
            raise Problem(
                422,
                "this Idempotency-Key was already used with a different request body; "
                "use a new key for a new request",
                slug="idempotency-key-reused",
            ) from None
        except service.KeyInFlight as exc:
            raise in_flight(exc.retry_after_s) from None


def in_flight(retry_after_s: float) -> Problem:
    seconds = max(1, round(retry_after_s))
    return Problem(
        409,
        "a request with this Idempotency-Key is still being processed; "
        f"retry in {seconds} s to get its response",
        slug="idempotency-key-in-flight",
        headers={"Retry-After": str(seconds)},
    )


def _with_token(response: Response, token: str | None) -> Response:
    response.headers.update(consistency.headers(token=token))
    return response


def _stored(response: Response) -> service.StoredResponse:
    return service.StoredResponse(
        status_code=response.status_code,
        headers={k: v for k, v in response.headers.items() if k not in _NOT_STORED},
        body=bytes(response.body).decode(),
    )


def _replay(stored: service.StoredResponse, token: str | None) -> Response:
    # The stored headers carry the first response's Content-Type.
    return Response(
        stored.body,
        status_code=stored.status_code,
        headers={**stored.headers, **consistency.headers(token=token), REPLAYED: "true"},
    )


async def idempotent_write(
    request: Request, db: DatabaseDep, settings: SettingsDep, key: IdempotencyKey = None
) -> IdempotentWrite:
    return IdempotentWrite(db, settings, key, method=request.method, path=request.url.path)


IdempotentWriteDep = Annotated[IdempotentWrite, Depends(idempotent_write)]
