"""Schema only through migrations: up from empty, down to empty, concurrent runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from service import domains
from service.db import migrate

SCHEMA = domains.schema()

ROOT = Path(__file__).resolve().parents[2]


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    cluster = request.getfixturevalue("postgres")
    name = f"m_{os.urandom(5).hex()}"
    cluster.create_database(name)
    try:
        yield cluster.primary_dsn(name).replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        cluster.drop_database(name)


async def test_upgrade_from_empty_to_head_and_back(empty_database_url):
    url = empty_database_url
    assert await _tables(url) == set()
    before, after = await migrate.migrate(url, SCHEMA)
    assert (before, after) == (None, migrate.head_revision(SCHEMA))
    assert await _tables(url) == set(SCHEMA.metadata.tables)
    assert (await migrate.migrate(url, SCHEMA)) == (after, after)  # a second run is a no-op
    before, after = await migrate.migrate(url, SCHEMA, revision="base", downgrade=True)
    assert after is None
    assert await _tables(url) == set()


async def test_migrations_match_the_models(empty_database_url):
    """Autogenerate finds nothing to do: models and migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    await migrate.migrate(empty_database_url, SCHEMA)
    engine = create_async_engine(empty_database_url)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), SCHEMA.metadata)
            )
    finally:
        await engine.dispose()
    assert diff == []


def _migrate_process(url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CATTLE_DATABASE_URL": url}
    return subprocess.Popen(
        [sys.executable, "-m", "service", "migrate"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.postgres
def test_two_concurrent_migrate_runs_both_succeed(postgres):
    name = f"c_{os.urandom(5).hex()}"
    postgres.create_database(name)
    try:
        url = postgres.primary_dsn(name)
        runs = [_migrate_process(url) for _ in range(2)]
        outputs = [run.communicate(timeout=120)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        # Exactly one of them did the work; the other waited and found head.
        head = migrate.head_revision(SCHEMA)
        assert sorted(outputs) == sorted(
            [f"schema: empty -> {head}\n", f"schema: {head} -> {head}\n"]
        ), outputs
        asyncpg_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        assert asyncio.run(_tables(asyncpg_url)) == set(SCHEMA.metadata.tables)
    finally:
        postgres.drop_database(name)


async def test_a_new_package_gets_a_branch_of_its_own(tmp_path):
    """`python -m service revision` starts a package's branch, then extends it."""
    location = tmp_path / "widgets" / "migrations"
    schema = migrate.Schema(SCHEMA.metadata, (*SCHEMA.locations, location))
    first = migrate.new_revision(schema, "widgets", message="widgets", autogenerate=False)
    second = migrate.new_revision(schema, "widgets", message="more", autogenerate=False)
    assert first.parent == second.parent == location
    assert "_widgets_0001_widgets.py" in first.name and "_widgets_0002_more.py" in second.name
    assert "down_revision: str | None = None" in first.read_text()
    assert "branch_labels: str | Sequence[str] | None = ('widgets',)" in first.read_text()
    assert "down_revision: str | None = 'widgets_0001'" in second.read_text()
    url = f"sqlite+aiosqlite:///{tmp_path / 'cattle.db'}"
    _, after = await migrate.migrate(url, schema)
    assert after == migrate.head_revision(schema)
    assert after is not None and "widgets_0002" in after.split(", ")
    with pytest.raises(ValueError, match=r"service/domains\.py"):
        migrate.new_revision(schema, "gadgets", message="x", autogenerate=False)
