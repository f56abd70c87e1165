"""Database.write on a connection the request already holds.

Found in a Patroni failover: a keyed create's key lock connection was
discarded when reading a token after the key's claim failed (the primary had
just died), and the create's own write then ran on that discarded connection:
SQLAlchemy's PendingRollbackError, a 500. A connection lost earlier in the
request is now refused as unavailable (503 at the edge), and the claim reads
no token at all.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from service.config import Settings
from service.db.engines import Database, consistency_token
from service.db.errors import ConnectionLost, is_unavailable


async def test_a_write_on_a_connection_lost_earlier_is_unavailable(settings: Settings) -> None:
    db = Database(settings)
    try:
        connection = await db.connect()
        try:
            await connection.invalidate()
            with pytest.raises(ConnectionLost) as raised:
                async with db.write(connection=connection) as session:
                    await session.execute(text("SELECT 1"))
            assert is_unavailable(raised.value)  # the app's 503 database-unavailable
        finally:
            await connection.close()
    finally:
        await db.dispose()


async def test_a_write_without_token_reads_none(settings: Settings) -> None:
    db = Database(settings)
    try:
        async with db.write(token=False) as session:
            await session.execute(text("SELECT 1"))
        if db.is_postgres:  # SQLite's token costs nothing: it is the commit counter
            assert consistency_token(session) is None
        async with db.write() as session:
            await session.execute(text("SELECT 1"))
        assert consistency_token(session) is not None
    finally:
        await db.dispose()
