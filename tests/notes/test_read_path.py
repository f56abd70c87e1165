"""The read path: one note read is one SQL statement, on either database.

A read runs outside any transaction (autocommit): on PostgreSQL that spares
the BEGIN and ROLLBACK round trips, on SQLite the hops to aiosqlite's thread
that each call into SQLite costs. One statement sees one snapshot, so a
single-statement read loses nothing by it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from service.app import create_app
from service.config import Settings
from tests.conftest import serve_asgi


async def test_reading_a_note_is_one_statement_and_no_transaction(settings: Settings) -> None:
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
        finally:
            event.remove(reader, "before_cursor_execute", on_statement)

    assert read.status_code == 200
    assert statements == ["SELECT"]  # no BEGIN before it
