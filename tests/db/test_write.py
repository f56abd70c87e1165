"""Database.write on a connection the request already holds.

Found in a Patroni failover: a keyed create's key lock connection was
discarded when reading a token after the key's claim failed (the primary had
just died), and the create's own write then ran on that discarded connection:
SQLAlchemy's PendingRollbackError, a 500. A connection lost earlier in the
request is now refused as unavailable (503 at the edge), and the claim reads
no token at all.
"""

from __future__ import annotations

from typing import Any

import asyncpg
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


# PostgreSQL only: there the token is a WAL position read after the commit;
# SQLite's is the commit counter, bumped in the write's own transaction.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize("own_connection", [False, True], ids=["pooled", "held"])
async def test_a_write_reads_its_token_in_one_round_trip_outside_a_transaction(
    settings: Settings, own_connection: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the commit the token is one query on the driver: through the engine
    it was a BEGIN, the query and a ROLLBACK, on every write."""
    sent: list[str] = []  # the driver's own calls, as the server receives them

    def counted(method: Any) -> Any:
        async def call(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            sent.append(" ".join(str(query).split()).rstrip(";").upper())
            return await method(self, query, *args, **kwargs)

        return call

    db = Database(settings)
    try:
        connection = await db.connect() if own_connection else None
        try:
            async with db.write(connection=connection) as session:
                await session.execute(text("SELECT 1"))
            sent.clear()  # the write's own statements are not the point
            for name in ("execute", "fetchval", "fetchrow", "fetch"):
                original = getattr(asyncpg.connection.Connection, name)
                monkeypatch.setattr(asyncpg.connection.Connection, name, counted(original))
            token = await db.current_token(connection=connection)
        finally:
            if connection is not None:
                await connection.close()
    finally:
        await db.dispose()
    assert token is not None
    assert sent == ["SELECT PG_CURRENT_WAL_INSERT_LSN()::TEXT"]
