"""Telling "the database is unreachable" apart from "this query is wrong".

The first is the node's problem and retryable: reads move to another source,
requests are answered 503 (not done, retry elsewhere). The second is a bug:
a 500 at the edge, logged.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

# Driver errors that mean "no usable server right now", whatever SQLAlchemy
# class wraps them: a dropped connection, a server shutting down or starting,
# no read-write host yet during a failover, a demoted primary refusing writes.
_ASYNCPG_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TargetServerAttributeNotMatched,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InterfaceError,
)


class DatabaseTimeout(ConnectionError):
    """The database did not answer within the node's client-side bound.

    A ConnectionError, so the app answers it 503 database-unavailable with
    Retry-After like any other unreachable database.
    """


class ConnectionLost(ConnectionError):
    """A connection the request holds was discarded by an earlier failure.

    A ConnectionError, so the app answers it 503 database-unavailable.
    """


class SourceUnavailable(ConnectionError):
    """A database source failed a read made on the driver itself (service/db/direct.py).

    A ConnectionError, so the app answers it 503 database-unavailable.
    """


def is_unavailable(exc: BaseException) -> bool:
    # The driver's own errors reach here unwrapped from reads on its pools (direct.py).
    if isinstance(exc, (OSError, TimeoutError, PoolTimeout, *_ASYNCPG_UNAVAILABLE)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
        return True
    cause: BaseException | None = exc.orig
    for _ in range(3):  # SQLAlchemy's adapter wraps the driver's exception
        if cause is None:
            break
        if isinstance(cause, _ASYNCPG_UNAVAILABLE):
            return True
        cause = cause.__cause__
    return False
