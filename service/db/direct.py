"""Hot reads on the driver itself: one statement, compiled once, no ORM.

A read of one row by key is the request a fleet serves most, and through an
ORM session on a pooled async engine most of its cost is the path, not the
database: checking a connection out of the pool, the async adaptation
around it, the identity map, attribute instrumentation. A `RowRead` is a
SQLAlchemy Core `select` (so the query, its types and both dialects are
still SQLAlchemy's) compiled once per dialect to the driver's SQL with the
types' own bind and result processors; `Database.fetch_row` runs it:

- on SQLite, on one read-only `sqlite3` connection per process, called on
  the event loop's thread. A lookup by primary key in WAL mode takes no
  lock a writer holds and returns in microseconds; a hand-off to a driver
  thread per statement (aiosqlite) costs more than the lookup. The
  connection's busy timeout bounds how long the loop can ever wait.
- on PostgreSQL, on an asyncpg pool per source (the primary and each
  replica) with the statement prepared once per connection: the driver's
  own pool, not SQLAlchemy's checkout and async adaptation around it. The
  source is chosen as for every read (service/db/engines.py).

Writes, migrations and every other read keep the ORM session path.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Select, column, select, table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import consistency


@dataclass(frozen=True, slots=True)
class Compiled:
    """A `RowRead` for one dialect: the driver's SQL and the types' processors."""

    sql: str
    params: tuple[str, ...]  # bind parameter names, in the SQL's positional order
    defaults: tuple[Any, ...]  # their values in the statement (a literal's), else None
    binds: tuple[Callable[[Any], Any] | None, ...]
    keys: tuple[str, ...]  # the row's column names
    results: tuple[Callable[[Any], Any] | None, ...]

    def arguments(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional arguments for `values`, through the types' bind processors."""
        given = [
            values[name] if default is None else values.get(name, default)
            for name, default in zip(self.params, self.defaults, strict=True)
        ]
        return tuple(
            value if bind is None else bind(value)
            for value, bind in zip(given, self.binds, strict=True)
        )

    def row(self, raw: Sequence[Any]) -> dict[str, Any]:
        """A driver row as a dict of Python values (the types' result processors)."""
        return {
            key: value if process is None else process(value)
            for key, value, process in zip(self.keys, raw, self.results, strict=False)
        }


def compile_for(statement: Select[*tuple[Any, ...]], dialect: Dialect) -> Compiled:
    compiled = statement.compile(dialect=dialect)
    params = tuple(compiled.positiontup or ())
    columns = list(statement.selected_columns)
    return Compiled(
        sql=str(compiled),
        params=params,
        defaults=tuple(compiled.binds[name].effective_value for name in params),
        binds=tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in params
        ),
        keys=tuple(str(c.key) for c in columns),
        results=tuple(
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ),
    )


# SQLite's position (consistency.COMMIT_COUNTER), read in the row's own
# statement: one statement is one snapshot, so the stamp and the row agree.
_COUNTER = table(consistency.COMMIT_COUNTER, column("id"), column("position"))
POSITION_KEY = "_commit_position"
_POSITION = (
    select(_COUNTER.c.position).where(_COUNTER.c.id == 1).scalar_subquery().label(POSITION_KEY)
)


class RowRead:
    """A read of at most one row, declared once at import (module level).

    `statement` is a Core `select` of columns with named bind parameters,
    such as `select(Note.id, Note.title).where(Note.id == bindparam("id"))`.
    """

    def __init__(self, statement: Select[*tuple[Any, ...]]) -> None:
        self.statement = statement
        # The same row with SQLite's commit counter as its last column.
        self.stamped_statement = statement.add_columns(_POSITION)
        self._compiled: dict[tuple[str, bool], Compiled] = {}

    def compiled(self, dialect: Dialect, *, stamped: bool = False) -> Compiled:
        key = (dialect.name, stamped)
        found = self._compiled.get(key)
        if found is None:
            statement = self.stamped_statement if stamped else self.statement
            found = self._compiled[key] = compile_for(statement, dialect)
        return found


class SQLiteUnavailable(ConnectionError):
    """The SQLite file could not be read now (locked past the bound, I/O error):
    a ConnectionError, so the app answers 503 database-unavailable."""


# Errors of an unreadable file rather than a wrong statement.
_UNAVAILABLE = ("locked", "busy", "disk i/o", "unable to open", "malformed", "readonly")


class SQLiteReader:
    """One read-only sqlite3 connection of this process, used on the loop's thread."""

    def __init__(self, path: Path, *, busy_timeout_ms: int) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._connection: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path,
            isolation_level=None,  # autocommit: each statement is its own snapshot
            check_same_thread=False,  # opened and used on the loop's thread, closed at shutdown
            cached_statements=64,
        )
        connection.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        connection.execute("PRAGMA query_only=ON")
        return connection

    def fetch(self, compiled: Compiled, arguments: tuple[Any, ...]) -> tuple[Any, ...] | None:
        try:
            if self._connection is None:
                self._connection = self._connect()
            row: tuple[Any, ...] | None = self._connection.execute(
                compiled.sql, arguments
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if not any(reason in str(exc).lower() for reason in _UNAVAILABLE):
                raise
            self.close()  # the next read opens a fresh one
            raise SQLiteUnavailable(f"the SQLite file could not be read: {exc}") from exc
        return row

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """These connections only run reads, outside transactions, and set nothing in
    the session: no reset query is due when one goes back to the pool. asyncpg's
    default sends one on every release (advisory locks, cursors, LISTEN, RESET
    ALL): a second round trip per read. The pool still rolls back a transaction
    left open before it calls this."""


class PostgresPools:
    """An asyncpg pool per PostgreSQL source, opened on first use, closed at shutdown.

    Each pool connects as the source's engine does (the dialect's own
    connect arguments: several hosts, target_session_attrs) with the same
    client-side bounds, and `connect_args` on top (server settings, timeouts).
    """

    def __init__(self, *, max_size: int, connect_args: Mapping[str, Any]) -> None:
        self.max_size = max_size
        self.connect_args = dict(connect_args)
        self._pools: dict[str, asyncpg.Pool] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def pool(self, name: str, engine: AsyncEngine) -> asyncpg.Pool:
        found = self._pools.get(name)
        if found is not None:
            return found
        async with self._opening.setdefault(name, asyncio.Lock()):
            found = self._pools.get(name)
            if found is None:
                _, kwargs = engine.dialect.create_connect_args(engine.url)
                found = self._pools[name] = await asyncpg.create_pool(
                    **kwargs,
                    **self.connect_args,
                    min_size=0,
                    max_size=self.max_size,
                    reset=_nothing_to_reset,
                )
            return found

    async def fetch(
        self,
        name: str,
        engine: AsyncEngine,
        compiled: Compiled,
        arguments: tuple[Any, ...],
        *,
        position: str | None = None,
    ) -> tuple[asyncpg.Record | None, str | None]:
        """The row, and (`position`: a query of one text value) the source's position,
        read first on the same connection."""
        pool = await self.pool(name, engine)
        async with pool.acquire() as connection:
            at = None if position is None else await connection.fetchval(position)
            row = await connection.fetchrow(compiled.sql, *arguments)
        return row, at

    async def close(self, timeout_s: float) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), timeout_s)
            except (Exception, TimeoutError):
                pool.terminate()  # a frozen server answers no goodbye
