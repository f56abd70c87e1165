"""Schema migrations as one explicit, locked step, and the check nodes make at start.

The database layer knows no domain. Each package that owns tables (the
domains, and infrastructure such as idempotency keys) keeps its migrations in
its own `migrations/` folder as an independent Alembic branch: a root revision
with no `down_revision`, labelled with the package's name (`branch_labels`),
revision ids prefixed with it (`notes_0001`) so they stay unique. The app's
list of packages (service/domains.py) hands their metadata and folders over
as a `Schema`; Alembic sees them as `version_locations` and migrates to
`heads`, every branch at once. A package whose tables need another's says so
with `depends_on`. Deleting a domain deletes its branch and nothing else.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from service import NAME, advisory_lock_id

# env.py and the revision template: shared by every branch.
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# pg_advisory_lock key shared by every `migrate` run against one database
# (derived from the service's name), so N replicas starting a migration Job at
# once queue.
MIGRATION_LOCK_ID = advisory_lock_id("migrate")


class MigrationLockTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class Schema:
    """The tables of a build and where their owners keep the migrations."""

    metadata: MetaData
    locations: tuple[Path, ...]


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    head: str

    @property
    def is_current(self) -> bool:
        return self.current == self.head


def alembic_config(schema: Schema) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option(
        "version_locations", os.pathsep.join(str(path) for path in schema.locations)
    )
    config.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    # env.py reads the metadata here rather than importing any package's models.
    config.attributes["target_metadata"] = schema.metadata
    return config


def _describe(revisions: Iterable[str]) -> str | None:
    """One branch head per owning package, as one stable string."""
    return ", ".join(sorted(revisions)) or None


def head_revision(schema: Schema) -> str:
    head = _describe(ScriptDirectory.from_config(alembic_config(schema)).get_heads())
    assert head is not None, "no migrations found"
    return head


def _current_revision(connection: Connection) -> str | None:
    return _describe(MigrationContext.configure(connection).get_current_heads())


async def schema_state(engine: AsyncEngine, schema: Schema) -> SchemaState:
    async with engine.connect() as connection:
        current = await connection.run_sync(_current_revision)
    return SchemaState(current=current, head=head_revision(schema))


def new_revision(schema: Schema, package: str, *, message: str, autogenerate: bool) -> Path:
    """Write the next migration of `package`'s branch; its first one starts the branch.

    With `autogenerate` Alembic drafts the operations by comparing the models
    with the database of the settings (which must be at `heads`): a draft to
    read, not a finished migration.
    """
    location = next((path for path in schema.locations if path.parent.name == package), None)
    if location is None:
        raise ValueError(f"{package!r} owns no migrations: is it listed in service/domains.py?")
    location.mkdir(parents=True, exist_ok=True)
    count = len(list(location.glob("*.py")))
    script = command.revision(
        alembic_config(schema),
        message=message,
        autogenerate=autogenerate,
        rev_id=f"{package}_{count + 1:04d}",
        head=f"{package}@head" if count else "base",
        branch_label=None if count else package,
        version_path=str(location),
    )
    # One head, one new script: a list would mean several branches were named.
    assert script is not None
    assert not isinstance(script, list)
    return Path(script.path)


@asynccontextmanager
async def _postgres_lock(connection: AsyncConnection, timeout_s: float) -> AsyncIterator[None]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await connection.scalar(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_ID}
        )
        await connection.commit()  # the lock is session level and outlives this transaction
        if got:
            break
        if time.monotonic() > deadline:
            raise MigrationLockTimeout(
                f"another migration has held the lock for over {timeout_s:.0f} s; "
                "wait for it to finish, or find it in pg_locks (objid "
                f"{MIGRATION_LOCK_ID & 0xFFFFFFFF})"
            )
        await asyncio.sleep(0.2)
    try:
        yield
    finally:
        await connection.execute(
            text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_ID}
        )
        await connection.commit()


@asynccontextmanager
async def _file_lock(database: str, timeout_s: float) -> AsyncIterator[None]:
    # SQLite has no advisory locks; a lock file beside the database plays the part.
    path = Path(database).with_name(Path(database).name + ".migrate.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MigrationLockTimeout(
                        f"{path} has been locked by another migration for over {timeout_s:.0f} s"
                    ) from None
                await asyncio.sleep(0.2)
        yield
    finally:
        os.close(fd)


async def migrate(
    url: str,
    schema: Schema,
    *,
    revision: str = "heads",
    downgrade: bool = False,
    lock_timeout_s: float = 120,
) -> tuple[str | None, str | None]:
    """Upgrade (or downgrade) the schema at `url` to `revision` under the lock.

    Returns the revisions before and after (one head per branch). Safe to run
    concurrently: later runs wait for the lock, then find nothing left to do.
    """
    config = alembic_config(schema)

    def _apply(connection: Connection) -> tuple[str | None, str | None]:
        before = _current_revision(connection)
        config.attributes["connection"] = connection
        if downgrade:
            command.downgrade(config, revision)
        else:
            command.upgrade(config, revision)
        return before, _current_revision(connection)

    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite" and sa_url.database:
        Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            if sa_url.get_backend_name() == "sqlite":
                lock = _file_lock(sa_url.database or f"{NAME}.db", lock_timeout_s)
            else:
                lock = _postgres_lock(connection, lock_timeout_s)
            async with lock:
                result = await connection.run_sync(_apply)
                await connection.commit()
    finally:
        await engine.dispose()
    return result
