"""Claim, complete and release idempotency keys.

The flow for a keyed request:
0. on PostgreSQL, `key_lock` takes an advisory lock on the key that dies
   with the node, so an orphaned key is known to be orphaned at once; the
   connection holding it carries every later step too, so a keyed request
   needs one pooled connection, like any other (a burst cannot exhaust the
   pool by holding locks while waiting for a second connection);
1. `claim` commits an in-flight record in its own short transaction, so every
   other node sees the key is taken (and answers 409) while work goes on;
2. the caller does its work and calls `complete` in the same transaction as
   that work, so the stored response and its effects commit together;
3. on failure the caller calls `release`, so a retry can start afresh.
A node that dies between 1 and 2 leaves an in-flight record. On PostgreSQL its
lock died with it, so a retry takes the key over at once; on SQLite the lease
must run out first. No step can make the work happen twice: `complete` only
succeeds for the current lease holder, in the same transaction as the work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, delete, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service import advisory_lock_id
from service.db.engines import Database, fetch_value
from service.db.errors import is_unavailable
from service.db.types import utcnow
from service.idempotency.models import IdempotencyRecord

log = logging.getLogger("service.idempotency")


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


class Holder(Enum):
    """What is known of whoever else may be working on a key."""

    NONE_ALIVE = "none-alive"  # we hold the key's lock: an in-flight record is orphaned
    ALIVE = "alive"  # a live request holds the key's lock
    UNKNOWN = "unknown"  # no lock available (SQLite): the lease decides


# pg_advisory_lock(int4, int4) namespace for key locks, derived from service.NAME.
_LOCK_NAMESPACE = advisory_lock_id("idempotency-keys", bits=32)
_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout
_UNLOCK = "SELECT pg_advisory_unlock($1, hashtext($2))"  # on the driver: no transaction


@dataclass
class KeyLock:
    """What `key_lock` found, and the connection every step of the request uses.

    `connection` is None on SQLite (no lock, each step takes a pooled
    connection of its own, one at a time).
    """

    holder: Holder
    connection: AsyncConnection | None = None
    # Set once the connection failed: it is discarded, not asked again (a
    # frozen server would make every further command wait its full timeout).
    broken: bool = False
    _pending: asyncio.Future[None] | None = None

    async def release(self, db: Database, lease: Lease, *, after: BaseException) -> None:
        """`release` on the lock's connection, shielded; never raises.

        A failed release costs nothing lasting: on PostgreSQL the key's lock
        dies with the connection (which is then discarded), elsewhere the
        lease runs out. `after` is the failure: when it says the database is
        unreachable, the connection is not asked again.
        """
        if self.connection is not None and is_unavailable(after):
            self.broken = True
            return
        self._pending = asyncio.ensure_future(self._release(db, lease))
        await asyncio.shield(self._pending)

    async def _release(self, db: Database, lease: Lease) -> None:
        try:
            await release(db, lease, connection=self.connection)
        except Exception:
            log.warning("could not give idempotency key back; its lock or lease will free it",
                        exc_info=True)  # fmt: skip


# A test-only switch: False makes `key_lock` claim the lock without taking it,
# which is what the race test's control needs to show the lock is what works.
LOCKING = True


@asynccontextmanager
async def key_lock(db: Database, key: str, *, wait_s: float = 1.0) -> AsyncIterator[KeyLock]:
    """Hold a PostgreSQL advisory lock on `key` while the request works on it.

    The lock lives on a connection of this node: if the node dies (kill -9,
    lost network), PostgreSQL drops the connection and the lock with it, so a
    retry on another node can take an orphaned key over at once instead of
    answering 409 until the lease runs out. Waiting up to `wait_s` for the
    lock covers both a holder about to finish (we then replay its response)
    and the moment PostgreSQL takes to notice a dead node's connection.

    The request's claim, work and release run on the same connection
    (`KeyLock.connection`), so a keyed request holds one pooled connection.
    """
    if not db.is_postgres:
        yield KeyLock(Holder.UNKNOWN)
        return
    args = {"ns": _LOCK_NAMESPACE, "key": key}
    conn = await db.connect()
    lock = KeyLock(Holder.NONE_ALIVE, conn)
    try:
        try:
            async with conn.begin():
                await conn.execute(text(f"SET LOCAL lock_timeout = {max(1, int(wait_s * 1000))}"))
                if LOCKING:
                    await conn.execute(text("SELECT pg_advisory_lock(:ns, hashtext(:key))"), args)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            lock.holder = Holder.ALIVE
        yield lock
    except BaseException as exc:
        # Cancelled mid-command (the request's bound) is as broken as gone.
        lock.broken = lock.broken or is_unavailable(exc) or isinstance(exc, asyncio.CancelledError)
        raise
    finally:
        # One shielded task ends the connection's use in order (a release
        # still running, the unlock, the return to the pool), so a cancelled
        # request neither leaves a lock behind nor runs two commands at once.
        await asyncio.shield(_finish(db, lock, args))


async def _finish(db: Database, lock: KeyLock, args: dict[str, Any]) -> None:
    conn = lock.connection
    assert conn is not None
    if lock._pending is not None:
        await asyncio.gather(lock._pending, return_exceptions=True)
    if lock.broken:
        await conn.invalidate()
        await conn.close()
        return
    try:
        # Bounded inside the request's bound: the work may have committed,
        # and a server that froze since must not turn that into a 503. Closing
        # the connection releases the lock as surely as the unlock does.
        async with asyncio.timeout(db.time_left_s()):
            if conn.in_transaction():
                await conn.rollback()
            if lock.holder is Holder.NONE_ALIVE and LOCKING:
                await fetch_value(conn, _UNLOCK, args["ns"], args["key"])
    except (Exception, TimeoutError):
        # Session locks outlive rollback: a connection that may still hold
        # one must never go back to the pool.
        await conn.invalidate()
    await conn.close()


async def claim(
    db: Database,
    *,
    key: str,
    fingerprint: str,
    lease_s: float,
    ttl_s: float,
    holder: Holder = Holder.UNKNOWN,
    connection: AsyncConnection | None = None,
) -> Lease | StoredResponse:
    """Take `key` for this request, or return the response it already produced.

    Raises KeyReused (different request, same key) or KeyInFlight. With
    `connection` (the key lock's), every transaction runs on it.
    """
    for _ in range(3):  # a record may vanish (purged) between insert and read
        now = utcnow()
        lease = Lease(key=key, token=secrets.token_hex(16))
        # With a live holder the key is not ours to create: only read its state.
        if holder is not Holder.ALIVE and await _insert(
            db,
            connection,
            IdempotencyRecord(
                key=key,
                fingerprint=fingerprint,
                lease_token=lease.token,
                lease_expires_at=now + timedelta(seconds=lease_s),
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            ),
        ):
            return lease
        async with db.write(connection=connection, token=False) as session:
            record = await session.get(IdempotencyRecord, key, with_for_update=True)
            if record is None:
                if holder is Holder.ALIVE:
                    raise KeyInFlight(1.0)
                continue
            if holder is Holder.ALIVE and (record.status_code is None or record.expires_at <= now):
                raise KeyInFlight(1.0)
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
            elif (
                holder is Holder.UNKNOWN
                and record.lease_expires_at is not None
                and record.lease_expires_at > now
            ):
                raise KeyInFlight((record.lease_expires_at - now).total_seconds())
            # The holder died (its lock is gone) or its lease ran out: take it over.
            record.lease_token = lease.token
            record.lease_expires_at = now + timedelta(seconds=lease_s)
        return lease
    raise KeyInFlight(1.0)


async def _insert(
    db: Database, connection: AsyncConnection | None, record: IdempotencyRecord
) -> bool:
    """Insert a new key; False if it already exists."""
    try:
        async with db.write(connection=connection, token=False) as session:
            session.add(record)
    except IntegrityError:
        return False
    return True


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


async def release(db: Database, lease: Lease, *, connection: AsyncConnection | None = None) -> None:
    """Give the key back after a failure, so a retry need not wait for the lease."""
    async with db.write(connection=connection, token=False) as session:
        await session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.key == lease.key,
                IdempotencyRecord.lease_token == lease.token,
                IdempotencyRecord.status_code.is_(None),
            )
        )


async def purge_expired(db: Database) -> int:
    """Delete records past retention; returns how many went."""
    async with db.write(token=False) as session:
        result = await _execute_dml(
            session, delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow())
        )
    return result.rowcount
