"""Claim, complete and release idempotency keys.

The flow for a keyed request:
1. `claim` commits an in-flight record in its own short transaction, so every
   other node sees the key is taken (and answers 409) while work goes on;
2. the caller does its work and calls `complete` in the same transaction as
   that work, so the stored response and its effects commit together;
3. on failure the caller calls `release`, so a retry can start afresh.
A node that dies between 1 and 2 leaves a lease that expires; a retry after
that takes the key over. No step can make the work happen twice.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.engines import Database
from service.db.types import utcnow
from service.idempotency.models import IdempotencyRecord


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    headers: dict[str, str]
    body: str


@dataclass(frozen=True)
class Lease:
    key: str
    token: str


class KeyReused(Exception):
    """The key was first used with a different request."""


class KeyInFlight(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class LeaseLost(Exception):
    """Our lease expired and another request took the key over."""


def fingerprint(method: str, path: str, payload: Any) -> str:
    """A digest of what the request asks for, insensitive to JSON formatting."""
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def claim(
    db: Database, *, key: str, fingerprint: str, lease_s: float, ttl_s: float
) -> Lease | StoredResponse:
    """Take `key` for this request, or return the response it already produced.

    Raises KeyReused (different request, same key) or KeyInFlight.
    """
    for _ in range(3):  # a record may vanish (purged) between insert and read
        now = utcnow()
        lease = Lease(key=key, token=secrets.token_hex(16))
        try:
            async with db.write() as session:
                session.add(
                    IdempotencyRecord(
                        key=key,
                        fingerprint=fingerprint,
                        lease_token=lease.token,
                        lease_expires_at=now + timedelta(seconds=lease_s),
                        created_at=now,
                        expires_at=now + timedelta(seconds=ttl_s),
                    )
                )
            return lease
        except IntegrityError:
            pass  # the key exists: find out in what state
        async with db.write() as session:
            record = await session.get(IdempotencyRecord, key, with_for_update=True)
            if record is None:
                continue
            if record.expires_at <= now:
                # Past retention but not yet purged: the key is free again.
                record.fingerprint = fingerprint
                record.created_at = now
                record.expires_at = now + timedelta(seconds=ttl_s)
                record.status_code = record.response_body = record.response_headers = None
            elif record.fingerprint != fingerprint:
                raise KeyReused(key)
            elif record.status_code is not None:
                return StoredResponse(
                    status_code=record.status_code,
                    headers=dict(record.response_headers or {}),
                    body=record.response_body or "",
                )
            elif record.lease_expires_at is not None and record.lease_expires_at > now:
                raise KeyInFlight((record.lease_expires_at - now).total_seconds())
            # Free, or the holder's lease ran out (it died or gave up): take it.
            record.lease_token = lease.token
            record.lease_expires_at = now + timedelta(seconds=lease_s)
        return lease
    raise KeyInFlight(1.0)


async def _execute_dml(session: AsyncSession, statement: Executable) -> CursorResult[Any]:
    # UPDATE/DELETE results are cursor results, which carry rowcount.
    return cast(CursorResult[Any], await session.execute(statement))


async def complete(session: AsyncSession, lease: Lease, response: StoredResponse) -> None:
    """Store the response in the caller's transaction; fails if the lease was lost."""
    result = await _execute_dml(
        session,
        update(IdempotencyRecord)
        .where(IdempotencyRecord.key == lease.key, IdempotencyRecord.lease_token == lease.token)
        .values(
            status_code=response.status_code,
            response_headers=response.headers,
            response_body=response.body,
            lease_token=None,
            lease_expires_at=None,
        ),
    )
    if result.rowcount != 1:
        raise LeaseLost(lease.key)


async def release(db: Database, lease: Lease) -> None:
    """Give the key back after a failure, so a retry need not wait for the lease."""
    async with db.write() as session:
        await session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.key == lease.key,
                IdempotencyRecord.lease_token == lease.token,
                IdempotencyRecord.status_code.is_(None),
            )
        )


async def purge_expired(db: Database) -> int:
    """Delete records past retention; returns how many went."""
    async with db.write() as session:
        result = await _execute_dml(
            session, delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow())
        )
    return result.rowcount
