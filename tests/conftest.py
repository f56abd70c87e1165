"""Shared fixtures: real databases (SQLite files, a PostgreSQL server the suite
starts itself) migrated by the project's own migrations, and an API client.

Under any truthy CI a missing dependency fails the test; elsewhere it skips
(tests/support.py decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from deploy.lab.postgres import PostgresCluster, PostgresNotInstalled, find_bindir
from service import domains
from service.app import create_app
from service.config import Settings
from service.db import migrate
from tests import hardening
from tests.support import require

TEMPLATE_DB = "cattle_template"


def scratch_dir(prefix: str) -> Path:
    # Under /tmp, never under /root: PostgreSQL runs as an unprivileged user
    # and must be able to reach its directories.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def postgres_cluster(prefix: str, *, replicas: int = 0) -> Iterator[PostgresCluster]:
    """A real PostgreSQL primary (and streaming replicas) in a scratch dir, removed after."""
    try:
        find_bindir()
    except PostgresNotInstalled as exc:
        require(False, str(exc))
    base = scratch_dir(prefix)
    cluster = PostgresCluster(base, replicas=replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
        shutil.rmtree(base, ignore_errors=True)


def migrated_template(cluster: PostgresCluster, name: str) -> str:
    """Create database `name` and bring it to head with the project's migrations."""
    cluster.create_database(name)
    asyncio.run(migrate.migrate(_asyncpg(cluster.primary_dsn(name)), domains.schema()))
    return name


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One real PostgreSQL server for the session, with a migrated template database."""
    with postgres_cluster("cattle-pg-") as cluster:
        migrated_template(cluster, TEMPLATE_DB)
        yield cluster


def _asyncpg(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "cattle.db"
    asyncio.run(migrate.migrate(f"sqlite+aiosqlite:///{path}", domains.schema()))
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database per test, on each backend."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "cattle.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = f"t_{uuid.uuid4().hex[:12]}"
    cluster.create_database(name, template=TEMPLATE_DB)
    try:
        yield _asyncpg(cluster.primary_dsn(name))
    finally:
        cluster.drop_database(name)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path,
        node_id="test-node",
        environment="production",
        cursor_secret="test-cursor-secret-0123456789",
    )


@contextlib.asynccontextmanager
async def serve_asgi(app: FastAPI) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any]]]:
    """Run `app`'s lifespan and give an httpx client speaking ASGI to it, and the state."""
    async with app.router.lifespan_context(app) as state:
        # What uvicorn does per request: hand each one a copy of the lifespan state.
        async def with_state(scope, receive, send):  # type: ignore[no-untyped-def]
            if scope["type"] == "http":
                scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
            yield http, dict(state)


@contextlib.asynccontextmanager
async def asgi_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client speaking ASGI to a node whose lifespan has run."""
    async with serve_asgi(create_app(settings)) as (http, _):
        yield http


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(settings) as http:
        yield http


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend this test runs on ("sqlite", "postgres"), for the hardening table."""
    callspec = getattr(request.node, "callspec", None)
    return str(callspec.params.get("database_url", "-")) if callspec else "-"


# Tests that start processes of their own, a cluster or an image build, or
# need PostgreSQL, by where they live; every other test runs inside pytest's
# process alone and is marked `inprocess`: `make test-fast` runs those, two
# at a time, and `make test` runs them so before the rest, three files at a time.
_OUT_OF_PROCESS = (
    "tests/system/",
    "tests/lab/",
    "tests/loadtests/",
    "tests/ship/test_image.py",
    "tests/ship/test_fork.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.relative_to(config.rootpath).as_posix()
        if (
            not where.startswith(_OUT_OF_PROCESS)
            and item.get_closest_marker("postgres") is None
            and item.get_closest_marker("cluster") is None
        ):
            item.add_marker(pytest.mark.inprocess)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # HARDENING_WRITE=1: the cases this run tried become docs/results/hardening.*.
    hardening.write_results(int(exitstatus))
