"""Direct reads (service/db/direct.py): compiled once, the types' processors, and
what an unreadable SQLite file does to one."""

from __future__ import annotations

import sqlite3
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Uuid, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite

from service.db.direct import RowRead, SQLiteReader, SQLiteUnavailable
from service.db.types import UTCDateTime

_TABLE = Table(
    "things",
    MetaData(),
    Column("id", Uuid, primary_key=True),
    Column("n", Integer),
    Column("at", UTCDateTime),
)
_BY_ID = RowRead(select(_TABLE.c.id, _TABLE.c.n, _TABLE.c.at).where(_TABLE.c.id == bindparam("id")))
_LITERAL = RowRead(select(_TABLE.c.n).where(_TABLE.c.id == bindparam("id"), _TABLE.c.n > 2))


def _file(path: Path, *, journal: str = "wal") -> tuple[uuid.UUID, datetime]:
    thing, at = uuid.uuid4(), datetime(2026, 11, 26, 3, 4, 5, tzinfo=UTC)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA journal_mode={journal}")
        db.execute("CREATE TABLE things (id CHAR(32) PRIMARY KEY, n INTEGER, at DATETIME)")
        db.execute(
            "INSERT INTO things VALUES (?, ?, ?)", (thing.hex, 7, "2026-11-26 03:04:05.000000")
        )
    return thing, at


def test_a_row_comes_back_as_the_types_give_it(tmp_path: Path) -> None:
    thing, at = _file(tmp_path / "t.db")
    reader = SQLiteReader(tmp_path / "t.db", busy_timeout_ms=20)
    compiled = _BY_ID.compiled(sqlite.dialect())
    assert _BY_ID.compiled(sqlite.dialect()) is compiled  # compiled once per dialect

    raw = reader.fetch(compiled, compiled.arguments({"id": thing}))

    assert raw is not None
    assert compiled.row(raw) == {"id": thing, "n": 7, "at": at}
    assert reader.fetch(compiled, compiled.arguments({"id": uuid.uuid4()})) is None
    # A literal of the statement is bound without the caller naming it.
    literal = _LITERAL.compiled(sqlite.dialect())
    assert reader.fetch(literal, literal.arguments({"id": thing})) == (7,)
    reader.close()


def test_postgresql_gets_numbered_parameters() -> None:
    compiled = _BY_ID.compiled(postgresql.asyncpg.dialect())
    assert "$1" in compiled.sql and compiled.params == ("id",)


def test_the_connection_refuses_writes(tmp_path: Path) -> None:
    thing, _ = _file(tmp_path / "t.db")
    reader = SQLiteReader(tmp_path / "t.db", busy_timeout_ms=20)
    compiled = _BY_ID.compiled(sqlite.dialect())
    reader.fetch(compiled, compiled.arguments({"id": thing}))  # opens it
    assert reader._connection is not None
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._connection.execute("DELETE FROM things")
    reader.close()


def test_a_locked_file_is_unavailable_within_the_busy_timeout(tmp_path: Path) -> None:
    thing, _ = _file(tmp_path / "t.db", journal="delete")  # WAL readers are never locked out
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    reader = SQLiteReader(tmp_path / "t.db", busy_timeout_ms=20)
    compiled = _BY_ID.compiled(sqlite.dialect())
    try:
        started = time.monotonic()
        with pytest.raises(SQLiteUnavailable, match="locked"):
            reader.fetch(compiled, compiled.arguments({"id": thing}))
        assert time.monotonic() - started < 1.0
        holder.execute("ROLLBACK")
        # The next read opens a fresh connection and succeeds.
        assert reader.fetch(compiled, compiled.arguments({"id": thing})) is not None
    finally:
        holder.close()
        reader.close()


def test_a_wrong_statement_is_not_called_unavailable(tmp_path: Path) -> None:
    _file(tmp_path / "t.db")
    reader = SQLiteReader(tmp_path / "t.db", busy_timeout_ms=20)
    missing = Table("missing", MetaData(), Column("id", Uuid))
    read = RowRead(select(missing.c.id).where(missing.c.id == bindparam("id")))
    compiled = read.compiled(sqlite.dialect())
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        reader.fetch(compiled, compiled.arguments({"id": uuid.uuid4()}))
    reader.close()
