"""Engines and sessions: one writer, readers, and the transaction boundary."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.config import Settings


def create_engine(url: str, settings: Settings, *, role: str) -> AsyncEngine:
    """An engine for `url` tuned for a node: bounded pool, named connections.

    `role` is "writer" or "reader"; on SQLite the writer takes the write lock at
    BEGIN (BEGIN IMMEDIATE) so two concurrent writers queue on busy_timeout
    instead of failing mid-transaction when one upgrades its read lock.
    """
    sa_url = make_url(url)
    kwargs: dict[str, Any] = {}
    if sa_url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, settings, role=role)
    if sa_url.get_driver_name() == "asyncpg":
        kwargs["connect_args"] = {
            "server_settings": {
                "application_name": f"cattle:{settings.node_id}:{role}",
                "statement_timeout": str(int(settings.db_statement_timeout_s * 1000)),
            },
            "timeout": settings.db_pool_timeout_s,
        }
    elif sa_url.get_driver_name() == "psycopg":
        kwargs["connect_args"] = {
            "application_name": f"cattle:{settings.node_id}:{role}",
            "options": f"-c statement_timeout={int(settings.db_statement_timeout_s * 1000)}",
            "connect_timeout": max(1, int(settings.db_pool_timeout_s)),
        }
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_pool_timeout_s,
        pool_recycle=1800,
        **kwargs,
    )


def _create_sqlite_engine(url: str, settings: Settings, *, role: str) -> AsyncEngine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout_s,
    )
    busy_timeout_ms = int(settings.db_statement_timeout_s * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    begin = "BEGIN IMMEDIATE" if role == "writer" else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


class Database:
    """The node's handle on its state: a writer engine and reader engines.

    Route handlers own the transaction: `async with db.write() as session:`
    commits when the block ends and rolls back if it raises, so a response is
    only produced after its data is durable.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.effective_database_url
        self.writer = create_engine(self.url, settings, role="writer")
        # SQLite needs a second engine whose BEGIN takes no write lock; on a
        # server database reads share the writer's pool until replicas are set.
        self.reader = (
            create_engine(self.url, settings, role="reader")
            if self.writer.dialect.name == "sqlite"
            else self.writer
        )
        self._writer_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._reader_sessions = async_sessionmaker(self.reader, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction on the primary, committed on success."""
        async with self._writer_sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads; never commits anything."""
        async with self._reader_sessions() as session:
            yield session

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()
