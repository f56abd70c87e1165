"""Engines and sessions: one writer, readers, and the transaction boundary."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import await_only

from service import NAME
from service.config import Settings
from service.db import consistency
from service.db.direct import (
    POSITION_KEY,
    PostgresPools,
    RowRead,
    SQLiteReader,
    SQLiteUnavailable,
)
from service.db.errors import ConnectionLost, DatabaseTimeout, SourceUnavailable, is_unavailable
from service.db.pool import PoolWatch
from service.db.replicas import Replica, ReplicaSet, replica_name

log = logging.getLogger("service.db")
T = TypeVar("T")


def create_engine(url: str, settings: Settings, *, role: str) -> AsyncEngine:
    """An engine for `url` tuned for a node: bounded pool, named connections.

    `role` is "writer" or "reader"; on SQLite the writer takes the write lock at
    BEGIN (BEGIN IMMEDIATE) so two concurrent writers queue on busy_timeout
    instead of failing mid-transaction when one upgrades its read lock, and
    the reader runs in autocommit, like reads on a server database.
    """
    sa_url = make_url(url)
    kwargs: dict[str, Any] = {}
    if sa_url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, settings, role=role)
    if sa_url.get_driver_name() == "asyncpg":
        kwargs["connect_args"] = asyncpg_connect_args(settings, role=role)
    if role == "reader":
        kwargs["isolation_level"] = "AUTOCOMMIT"  # single-statement reads need no BEGIN
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_pool_timeout_s,
        pool_recycle=1800,
        **kwargs,
    )


def asyncpg_connect_args(settings: Settings, *, role: str) -> dict[str, Any]:
    """What every asyncpg connection of the node is opened with."""
    # The client-side bounds (reasons in service/config.py): a frozen
    # server answers nothing, so only the client can stop waiting.
    return {
        "server_settings": {
            "application_name": f"{NAME}:{settings.node_id}:{role}",
            "statement_timeout": str(int(settings.db_statement_timeout_s * 1000)),
        },
        "timeout": settings.db_connect_timeout_s,
        "command_timeout": settings.db_command_timeout_s,
    }


def _create_sqlite_engine(url: str, settings: Settings, *, role: str) -> AsyncEngine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    reader = role == "reader"
    # Reads are single statements, and SQLite runs each in a snapshot of its
    # own: the reader needs no BEGIN, and with no transaction ever open its
    # connections need no rollback when they go back to the pool. Every call
    # into SQLite is a hop to aiosqlite's thread, and autocommit takes a read
    # from 9 hops to 5.
    autocommit: dict[str, Any] = (
        {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None} if reader else {}
    )
    engine = create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout_s,
        **autocommit,
    )
    busy_timeout_ms = int(settings.db_statement_timeout_s * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    if reader:
        return engine

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def use_wal(cursor: Any, *, attempts: int = 20) -> None:
    """Put the SQLite file in WAL mode, also when several nodes open it at once.

    WAL is a property of the file, so only the first connection changes it;
    the rest see "wal" and go on. Switching takes an exclusive lock, and
    SQLite answers "database is locked" at once (its busy handler is not
    asked) to connections that raced for it, so the switch is retried a
    bounded number of times with a short back-off.
    """
    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode")
            if cursor.fetchone()[0] == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the driver's OperationalError, adapted or not
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            # Runs inside SQLAlchemy's async bridge: wait without blocking the loop.
            await_only(asyncio.sleep(0.005 * (attempt + 1)))


class Database:
    """The node's handle on its state: a writer engine and reader engines.

    Route handlers own the transaction: `async with db.write() as session:`
    commits when the block ends and rolls back if it raises, so a response is
    only produced after its data is durable. Reads go through `db.run_read(...)`,
    which picks a replica fresh enough for the caller, else the primary.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.effective_database_url
        self.writer = create_engine(self.url, settings, role="writer")
        self.is_postgres = self.writer.dialect.name == "postgresql"
        # SQLite needs a second engine whose BEGIN takes no write lock; on a
        # server database, primary reads share the writer's pool.
        self.reader = (
            # Reads are single statements: autocommit spares each one a
            # BEGIN and a ROLLBACK round trip (the same pool, no new connections).
            self.writer.execution_options(isolation_level="AUTOCOMMIT")
            if self.is_postgres
            else create_engine(self.url, settings, role="reader")
        )
        # Hot reads by key on SQLite: the driver on the loop's thread (direct.py).
        database = make_url(self.url).database
        self.direct = (
            SQLiteReader(Path(database), busy_timeout_ms=_DIRECT_BUSY_TIMEOUT_MS)
            if not self.is_postgres and database and database != ":memory:"
            else None
        )
        # Hot reads by key on PostgreSQL: the driver's own pools (direct.py).
        self.pools = (
            PostgresPools(
                max_size=settings.db_pool_size,
                connect_args=asyncpg_connect_args(settings, role="direct-reader"),
            )
            if self.is_postgres
            else None
        )
        self.pool_watch = PoolWatch()
        self._writer_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._reader_sessions = async_sessionmaker(self.reader, expire_on_commit=False)
        self.replicas = ReplicaSet(
            self.writer,
            [
                (replica_name(url, i), create_engine(url, settings, role="reader"))
                for i, url in enumerate(settings.read_database_urls)
            ],
            max_lag_s=settings.replica_max_lag_s,
        )

    @asynccontextmanager
    async def bounded(self) -> AsyncIterator[None]:
        """Bound the database work inside to db_request_timeout_s, and watch the pool.

        Past the bound the work is cancelled and DatabaseTimeout raised (a
        503 at the edge). Nested uses keep the outermost deadline.
        """
        if _DEADLINE.get() is not None:
            yield
            return
        bound_s = self.settings.db_request_timeout_s
        deadline = _DEADLINE.set(asyncio.get_running_loop().time() + bound_s)
        try:
            async with asyncio.timeout(bound_s):
                yield
        except PoolTimeout as exc:
            self.pool_watch.exhausted(exc)
            raise
        except TimeoutError as exc:
            raise DatabaseTimeout(
                "the database did not answer within "
                f"{self.settings.db_request_timeout_s} s (CATTLE_DB_REQUEST_TIMEOUT_S)"
            ) from exc
        finally:
            _DEADLINE.reset(deadline)

    async def connect(self) -> AsyncConnection:
        """A writer connection of the caller's own; the caller closes it."""
        async with self.bounded():
            return await self.writer.connect()

    @asynccontextmanager
    async def write(
        self, *, connection: AsyncConnection | None = None, token: bool = True
    ) -> AsyncIterator[AsyncSession]:
        """A session in a transaction on the primary, committed on success.

        After the commit, `consistency_token(session)` gives the token that
        lets any node read this write back; `token=False` skips reading it
        (bookkeeping no client reads back, such as claiming an idempotency
        key: one round trip less). With `connection`, the session
        runs on it (a caller that holds one already needs no second). A
        connection that failed or overran the bound is discarded without
        another command: a frozen server would make even the ROLLBACK wait,
        and a discarded connection can commit nothing when the server wakes.
        A connection already discarded earlier in the request (its token
        could not be read, say) is refused as unavailable: a 503, not a 500.
        """
        if connection is not None:
            if connection.invalidated:
                raise ConnectionLost("the database connection was lost earlier in this request")
            session = AsyncSession(bind=connection, expire_on_commit=False)
        else:
            session = self._writer_sessions()
        async with self.bounded():
            try:
                yield session
                if self.is_postgres:
                    await session.commit()
                    if token:
                        session.info[_TOKEN_KEY] = await self.current_token(connection=connection)
                else:
                    # In the transaction: the position commits with the write.
                    position = await session.scalar(_BUMP_COMMIT_COUNTER)
                    await session.commit()
                    if position is not None:
                        session.info[_TOKEN_KEY] = consistency.encode(position)
            except BaseException as exc:
                if _dead(exc):
                    await session.invalidate()
                else:
                    await session.rollback()
                raise
            finally:
                await session.close()

    async def current_token(self, *, connection: AsyncConnection | None = None) -> str | None:
        """A token covering everything committed so far on the primary.

        Bounded within the request's bound: a write that committed is never
        failed because its token could not be read.
        """
        # The insert position, read after our commit, is at or past the end
        # of our commit record even with synchronous_commit=off, where the
        # write position (pg_current_wal_lsn) may not have reached it yet.
        owned = None  # a connection of our own, when the caller holds none
        try:
            async with asyncio.timeout(self.time_left_s()):
                if not self.is_postgres:
                    # Every write committed its position with it: the counter covers them all.
                    async with self.reader.connect() as conn:
                        counter = await conn.scalar(_READ_COMMIT_COUNTER)
                    return None if counter is None else consistency.encode(counter)
                if connection is None:
                    # Any connection to the primary will do: the WAL position is global.
                    connection = owned = await self.writer.connect()
                position = await fetch_value(connection, _INSERT_LSN)
        except (Exception, TimeoutError):
            # The write is committed; failing it now would invite a duplicate.
            log.warning("no consistency token: WAL position unavailable", exc_info=True)
            if connection is not None:
                await connection.invalidate()  # it may be mid-command: never reused
            return None
        finally:
            if owned is not None:
                await owned.close()
        return consistency.encode(consistency.parse_lsn(str(position)))

    def time_left_s(self) -> float:
        """What is left of the request's bound (at most one command's timeout),
        less a margin to answer in: for work after a commit, which must give
        up before the bound turns a committed write into a 503."""
        left = self.settings.db_command_timeout_s
        deadline = _DEADLINE.get()
        if deadline is not None:
            left = min(left, deadline - asyncio.get_running_loop().time() - _TOKEN_MARGIN_S)
        return max(0.0, left)

    async def run_read(
        self, read: Callable[[AsyncSession], Awaitable[T]], *, min_lsn: int | None = None
    ) -> tuple[T, str]:
        """Run `read` on a replica that has replayed `min_lsn`, else on the primary.

        Returns its result and the source's name. A replica that fails during
        the read is taken out of rotation and the read runs again on the
        primary, so losing a replica costs no request.
        """
        value, source, _ = await self._run_read(read, min_lsn=min_lsn, stamped=False)
        return value, source

    async def run_stamped_read(
        self, read: Callable[[AsyncSession], Awaitable[T]], *, min_lsn: int | None = None
    ) -> tuple[T, str, int | None]:
        """`run_read`, plus the source's position read before `read`, in its session.

        The position (see `position`) is one every write whose consistency
        token is at or below it is visible to `read`: what a cache stamps
        the result with. None when the source has none to give.
        """
        return await self._run_read(read, min_lsn=min_lsn, stamped=True)

    async def _run_read(
        self, read: Callable[[AsyncSession], Awaitable[T]], *, min_lsn: int | None, stamped: bool
    ) -> tuple[T, str, int | None]:
        async def attempt(replica: Replica | None) -> tuple[T, str, int | None]:
            async with self._session(replica) as session:
                stamp = await self.position(session) if stamped else None
                return await read(session), read_source(session), stamp

        return await self._on_a_source(attempt, min_lsn=min_lsn)

    async def fetch_row(
        self,
        read: RowRead,
        values: Mapping[str, Any],
        *,
        min_lsn: int | None = None,
        stamped: bool = False,
    ) -> tuple[dict[str, Any] | None, str, int | None]:
        """Run `read` with `values`: the row (or None), its source, and (`stamped`)
        the source's position as `run_stamped_read` gives it.

        On SQLite it runs on the driver in the loop's thread, the stamp in the
        same statement; every committed write is visible to it, so `min_lsn`
        asks nothing more. If the file is busy past the short bound, the read
        goes the session way, which waits without holding the loop. On
        PostgreSQL it runs on the driver's own pool of the source chosen as
        for every read.
        """
        if self.direct is not None:
            compiled = read.compiled(self.writer.dialect, stamped=stamped)
            try:
                raw = self.direct.fetch(compiled, compiled.arguments(values))
            except SQLiteUnavailable:
                log.info("direct SQLite read failed; reading through a session", exc_info=True)
            else:
                if raw is None:
                    return None, "primary", None
                row = compiled.row(raw)
                stamp = row.pop(POSITION_KEY) if stamped else None
                return row, "primary", None if stamp is None else int(stamp)

        if self.pools is not None:
            pools = self.pools
            compiled = read.compiled(self.writer.dialect)
            arguments = compiled.arguments(values)

            async def on_driver(
                replica: Replica | None,
            ) -> tuple[dict[str, Any] | None, str, int | None]:
                name, engine = (
                    ("primary", self.writer) if replica is None else (replica.name, replica.engine)
                )
                try:
                    raw, at = await pools.fetch(
                        name,
                        engine,
                        compiled,
                        arguments,
                        position=_position_query(replica) if stamped else None,
                    )
                except Exception as exc:
                    if (
                        replica is None
                        and is_unavailable(exc)
                        and not isinstance(exc, ConnectionError)
                    ):
                        # A raw driver error: named as the session path names it (a 503).
                        raise SourceUnavailable(f"the primary could not be read: {exc}") from exc
                    raise
                row = None if raw is None else compiled.row(tuple(raw))
                return row, name, None if at is None else _stamp(replica, at)

            return await self._on_a_source(on_driver, min_lsn=min_lsn)

        async def fetch(session: AsyncSession) -> dict[str, Any] | None:
            found = (await session.execute(read.statement, dict(values))).first()
            return None if found is None else dict(found._mapping)

        return await self._run_read(fetch, min_lsn=min_lsn, stamped=stamped)

    async def _on_a_source(
        self, attempt: Callable[[Replica | None], Awaitable[T]], *, min_lsn: int | None
    ) -> T:
        """The one way a read chooses its source: `attempt(replica)` on a replica
        that has replayed `min_lsn`, else `attempt(None)` on the primary. A
        replica that fails as unavailable leaves rotation and the attempt runs
        again on the primary, so losing a replica costs no request."""
        async with self.bounded():
            replica = self.replicas.pick(min_lsn)
            if replica is None and min_lsn is not None:
                replica = await self._replica_caught_up_now(min_lsn)
            if replica is not None:
                try:
                    return await attempt(replica)
                except Exception as exc:
                    if not is_unavailable(exc):
                        raise
                    replica.mark_unreachable(exc)
                    log.info("read failed on a replica; running it on the primary", exc_info=True)
            return await attempt(None)

    async def position(self, session: AsyncSession) -> int | None:
        """The position of `session`'s source, read now: every write whose token
        is at or below it is visible to the session's next statement.

        The next statement takes its snapshot after this one (reads run in
        autocommit), on the same connection, so on the same source.

        - SQLite: the commit counter. Each write bumps it inside its own
          transaction, so the counter and the write become visible together,
          in every process sharing the file.
        - A replica: `pg_last_wal_replay_lsn()`. Replay applies a commit
          record (the transaction becomes visible) before it advances this
          position, so every commit at or below it is visible.
        - The primary: `pg_current_wal_insert_lsn() - 1`, deliberately below
          the position. On the primary a commit record is in the WAL (and the
          insert, write and flush positions past it) while its transaction
          still waits to become visible: for the WAL flush and for
          synchronous standbys. So "at or below the insert position" does
          not mean visible, and neither does the write position. But a
          token is read after its write became visible, from the same
          position that only rises: a position read now that is strictly
          above a token was read after that token, hence after the write
          became visible. Hence minus one: "at or below the stamp" becomes
          "strictly below the position". The cost: a read right after the
          last write, with no WAL since, is not stored for that write's token.
        """
        if not self.is_postgres:
            position = await session.scalar(_READ_COMMIT_COUNTER)
            return None if position is None else int(position)
        replica = session.info.get(_REPLICA_KEY)
        lsn = await session.scalar(text(_position_query(replica)))
        return None if lsn is None else _stamp(replica, str(lsn))

    @asynccontextmanager
    async def _session(self, replica: Replica | None) -> AsyncIterator[AsyncSession]:
        """A read-only session on `replica`, or on the primary for None.

        `read_source(session)` names the source, for attribution. A
        connection that failed mid-command is discarded, never pooled again.
        """
        session = self._reader_sessions() if replica is None else replica.sessions()
        session.info[_SOURCE_KEY] = "primary" if replica is None else replica.name
        session.info[_REPLICA_KEY] = replica
        async with session:
            try:
                yield session
            except BaseException as exc:
                if _dead(exc):
                    # Mid-command or gone: back in the pool it would hang the next user.
                    await session.invalidate()
                raise

    async def _replica_caught_up_now(self, min_lsn: int) -> Replica | None:
        """Ask one usable replica for its live position: the cached one may be
        a check interval old, and the primary is the last resort, not the first."""
        replica = self.replicas.pick()
        if replica is None:
            return None
        try:
            async with replica.engine.connect() as conn:
                position = await conn.scalar(text(_REPLAY_LSN))
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            replica.mark_unreachable(exc)
            return None
        if position is None:
            return None
        replica.replay_lsn = max(replica.replay_lsn or 0, consistency.parse_lsn(str(position)))
        return replica if replica.replay_lsn >= min_lsn else None

    async def dispose(self) -> None:
        if self.direct is not None:
            self.direct.close()
        if self.pools is not None:
            await self.pools.close(self.settings.db_command_timeout_s)
        await self.replicas.dispose()
        await self.writer.dispose()
        if not self.is_postgres:
            await self.reader.dispose()


# The loop time by which the current request's database work must end
# (Database.bounded); per task, so nested calls share their request's bound.
_DEADLINE: ContextVar[float | None] = ContextVar("database_deadline", default=None)
# How long a direct SQLite read may hold the event loop waiting for a lock
# (WAL readers wait only on recovery and checkpoint edge cases); past it
# the read goes through a session, whose wait holds no loop.
_DIRECT_BUSY_TIMEOUT_MS = 20
# Left for answering once the token's read gave up, inside the request's bound.
_TOKEN_MARGIN_S = 0.25


def _dead(exc: BaseException) -> bool:
    """The connection may be mid-command or gone: only discarding it is safe."""
    return is_unavailable(exc) or isinstance(exc, asyncio.CancelledError)


# SQLite's stand-in for a WAL position: a one-row counter every write
# transaction bumps. Its table belongs to the read cache's migration branch
# (service/cache/models.py): the cache is what orders reads against writes.
_COUNTER = consistency.COMMIT_COUNTER
_BUMP_COMMIT_COUNTER = text(
    f"UPDATE {_COUNTER} SET position = position + 1 WHERE id = 1 RETURNING position"  # noqa: S608 (a constant)
)
_READ_COMMIT_COUNTER = text(f"SELECT position FROM {_COUNTER} WHERE id = 1")  # noqa: S608

# A source's WAL position (see Database.position): replay on a replica; on
# the primary the insert position, which a token is read from too.
_REPLAY_LSN = "SELECT pg_last_wal_replay_lsn()::text"
_INSERT_LSN = "SELECT pg_current_wal_insert_lsn()::text"


async def fetch_value(connection: AsyncConnection, query: str, *args: Any) -> Any:
    """One PostgreSQL query on the driver of `connection`, outside any
    transaction: one round trip, where the engine would wrap it in a BEGIN
    and a COMMIT or ROLLBACK (three). For functions that read no table: the
    WAL position after a write, an advisory unlock. The caller invalidates
    the connection if it fails: the engine does not see this call."""
    raw = await connection.get_raw_connection()
    return await raw.driver_connection.fetchval(query, *args)  # type: ignore[union-attr]


def _position_query(replica: Replica | None) -> str:
    return _INSERT_LSN if replica is None else _REPLAY_LSN


def _stamp(replica: Replica | None, lsn: str) -> int:
    """A position read with `_position_query`, as a cache stamp: on the primary
    one below it, for the reason `Database.position` gives."""
    position = consistency.parse_lsn(lsn)
    return position - 1 if replica is None else position


_TOKEN_KEY = "consistency_token"  # noqa: S105 (a dict key, not a secret)
_SOURCE_KEY = "read_source"
_REPLICA_KEY = "replica"


def consistency_token(session: AsyncSession) -> str | None:
    token: str | None = session.info.get(_TOKEN_KEY)
    return token


def read_source(session: AsyncSession) -> str:
    source: str = session.info.get(_SOURCE_KEY, "primary")
    return source
