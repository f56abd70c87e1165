"""The read path: one note read is one SQL statement, on either database.

On SQLite the read by id runs on the node's direct connection (the driver on
the event loop's thread, service/db/direct.py), never through the engine;
with the read cache on, the entry's stamp (the commit counter) is read in
that same statement. On PostgreSQL it runs through the reader engine outside
any transaction (autocommit spares the BEGIN and ROLLBACK round trips); with
the cache on, a miss adds the one statement that stamps the entry (the
source's position, read before the row). A hit runs none.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from service.app import create_app
from service.config import Settings
from service.db.direct import SQLiteUnavailable
from tests.conftest import serve_asgi


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "cache-on"])
async def test_reading_a_note_is_one_statement_and_no_transaction(
    settings: Settings, cache: bool
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
    if database.direct is not None:
        assert engine_statements == []  # never through the engine
        # One statement: with the cache on, the stamp is a column of it.
        assert first == ["SELECT"]
        assert direct_statements == (["SELECT"] if cache else ["SELECT", "SELECT"])
    elif not cache:
        assert first == ["SELECT"]  # no BEGIN before it
        assert engine_statements == ["SELECT", "SELECT"]
    else:
        assert first == ["SELECT", "SELECT"]  # the position, then the note; no BEGIN
        assert engine_statements == first  # the second read was a hit
    if cache:
        assert again.headers["x-read-source"] == "cache"


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
