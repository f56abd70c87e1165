"""The read path: one note read is one SQL statement, on either database.

A read runs outside any transaction (autocommit): on PostgreSQL that spares
the BEGIN and ROLLBACK round trips, on SQLite the hops to aiosqlite's thread
that each call into SQLite costs. One statement sees one snapshot, so a
single-statement read loses nothing by it. With the read cache on, a miss
adds the one statement that stamps the entry (the source's position, read
before the row), and a hit runs none.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

from service.app import create_app
from service.config import Settings
from tests.conftest import serve_asgi


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "cache-on"])
async def test_reading_a_note_is_one_statement_and_no_transaction(
    settings: Settings, cache: bool
) -> None:
    settings = settings.model_copy(update={"cache": cache})
    async with serve_asgi(create_app(settings)) as (http, state):
        created = await http.post("/v1/notes", json={"title": "read", "body": "path"})
        assert created.status_code == 201
        # On PostgreSQL the reader is a view of the writer engine (autocommit
        # on the same pool): its events are the writer's, so one listener
        # sees every statement of the node.
        reader = state["database"].reader.sync_engine
        statements: list[str] = []

        def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement.split()[0].upper())

        event.listen(reader, "before_cursor_execute", on_statement)
        try:
            read = await http.get(created.headers["location"])
            first = list(statements)
            again = await http.get(created.headers["location"])
        finally:
            event.remove(reader, "before_cursor_execute", on_statement)

    assert read.status_code == again.status_code == 200
    if not cache:
        assert first == ["SELECT"]  # no BEGIN before it
        assert statements == ["SELECT", "SELECT"]
        return
    assert first == ["SELECT", "SELECT"]  # the position, then the note; no BEGIN
    assert statements == first  # the second read was a hit
    assert again.headers["x-read-source"] == "cache"
