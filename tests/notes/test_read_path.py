"""The read path: one note read is one SQL statement, on either database.

The read by id runs on the driver itself (service/db/direct.py), never
through the engine: on SQLite on the node's one direct connection (the
driver on the event loop's thread), where with the read cache on the entry's
stamp (the commit counter) is a column of that same statement; on PostgreSQL
on an asyncpg pool outside any transaction, where with the cache on a miss
adds the one statement that stamps the entry (the source's position, read
before the row). A hit runs none.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event

from service.app import create_app
from service.config import Settings
from service.db.direct import SQLiteUnavailable
from tests.conftest import serve_asgi


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "cache-on"])
async def test_reading_a_note_is_one_statement_and_no_transaction(
    settings: Settings, cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"cache": cache})
    async with serve_asgi(create_app(settings)) as (http, state):
        created = await http.post("/v1/notes", json={"title": "read", "body": "path"})
        assert created.status_code == 201
        database = state["database"]
        # On PostgreSQL the reader is a view of the writer engine (autocommit
        # on the same pool): its events are the writer's, so one listener
        # sees every statement of the node.
        reader = database.reader.sync_engine
        engine_statements: list[str] = []
        direct_statements: list[str] = []

        def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            engine_statements.append(statement.split()[0].upper())

        # `execute` too: asyncpg's pool would send its reset query through it
        # on every release, a second statement per read.
        for method in ("fetchrow", "fetchval", "execute"):
            monkeypatch.setattr(
                asyncpg.connection.Connection,
                method,
                _counted(getattr(asyncpg.connection.Connection, method), direct_statements),
            )
        event.listen(reader, "before_cursor_execute", on_statement)
        try:
            if database.direct is not None:
                database.direct.fetch(*_warm(database))  # opens the connection
                database.direct._connection.set_trace_callback(
                    lambda sql: direct_statements.append(sql.split()[0].upper())
                )
            read = await http.get(created.headers["location"])
            first = engine_statements + direct_statements
            again = await http.get(created.headers["location"])
        finally:
            event.remove(reader, "before_cursor_execute", on_statement)

    assert read.status_code == again.status_code == 200
    assert read.json()["title"] == "read"
    assert engine_statements == []  # never through the engine
    if database.direct is not None or not cache:
        # One statement (SQLite: with the cache on, the stamp is a column of it).
        assert first == ["SELECT"]
    else:
        assert first == ["SELECT", "SELECT"]  # the position, then the note; no BEGIN
    # With the cache on, the second read was a hit: no statement.
    assert direct_statements == (first if cache else first + first)
    if cache:
        assert again.headers["x-read-source"] == "cache"


def _counted(method: Any, statements: list[str]) -> Any:
    async def counted(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        statements.append(query.split()[0].upper())
        return await method(self, query, *args, **kwargs)

    return counted


def _warm(database: Any) -> tuple[Any, tuple[Any, ...]]:
    from service.notes.service import NOTE_BY_ID

    compiled = NOTE_BY_ID.compiled(database.writer.dialect)
    return compiled, compiled.arguments({"id": uuid.UUID(int=0)})


async def test_an_unreadable_direct_connection_reads_through_a_session(
    sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copyfile(sqlite_template, tmp_path / "cattle.db")
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'cattle.db'}", data_dir=tmp_path, cache=False
    )
    async with serve_asgi(create_app(settings)) as (http, state):
        created = await http.post("/v1/notes", json={"title": "busy", "body": "file"})
        database = state["database"]
        assert database.direct is not None

        def busy(*_: Any) -> None:
            raise SQLiteUnavailable("the SQLite file could not be read: database is locked")

        monkeypatch.setattr(database.direct, "fetch", busy)
        read = await http.get(created.headers["location"])

    assert read.status_code == 200
    assert read.json()["title"] == "busy"
