"""The read cache against a real PostgreSQL primary and a streaming replica.

Replay is paused on the replica to hold a source at an old position for as
long as the test needs; "node A" and "node B" are two apps with their own
pools, replica monitors and caches, and no bus between them: the only
invalidation B ever gets is the one a test hands it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from deploy.lab.postgres import PostgresCluster
from service.app import create_app
from service.cache import store
from service.config import Settings
from service.db import consistency
from tests.conftest import migrated_template, postgres_cluster, serve_asgi
from tests.support import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.cluster]

TEMPLATE = "cattle_cache_template"


@pytest.fixture(scope="module")
def replicated() -> Iterator[PostgresCluster]:
    with postgres_cluster("cattle-cache-", replicas=1) as cluster:
        migrated_template(cluster, TEMPLATE)
        yield cluster


@pytest.fixture
def dbname(replicated: PostgresCluster) -> Iterator[str]:
    name = f"c_{os.urandom(5).hex()}"
    replicated.create_database(name, template=TEMPLATE)
    replica = replicated.replicas[0].name

    def reachable() -> bool:
        try:
            return replicated.psql("SELECT 1", member=replica, dbname=name) == "1"
        except Exception:
            return False

    if wait_until(reachable, timeout_s=15, interval_s=0.1) is None:
        pytest.fail(f"database {name} never reached {replica}")
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            replicated.psql("SELECT pg_wal_replay_resume()", member=replica)
        replicated.drop_database(name)


@contextlib.asynccontextmanager
async def node(
    cluster: PostgresCluster, dbname: str, node_id: str
) -> AsyncIterator[tuple[httpx.AsyncClient, dict]]:
    settings = Settings(
        database_url=cluster.primary_dsn(dbname),
        read_database_urls=",".join(cluster.replica_dsns(dbname)),
        node_id=node_id,
        environment="production",
        cursor_secret="test-cursor-secret-0123456789",
        replica_check_interval_s=0.2,
        # A paused replica stays in rotation for the test's length, and entries
        # outlive it: only stamps and tombstones can keep reads right.
        replica_max_lag_s=120,
        cache_ttl_s=60,
        bus=False,
    )
    async with serve_asgi(create_app(settings)) as (http, state):
        yield http, state


@contextlib.contextmanager
def replay_paused(cluster: PostgresCluster) -> Iterator[None]:
    replica = cluster.replicas[0].name
    cluster.psql("SELECT pg_wal_replay_pause()", member=replica)
    try:
        yield
    finally:
        cluster.psql("SELECT pg_wal_replay_resume()", member=replica)


def _replica_title(cluster: PostgresCluster, dbname: str, note_id: str) -> str:
    return cluster.psql(
        f"SELECT title FROM notes WHERE id = '{uuid.UUID(note_id)}'",  # noqa: S608
        member=cluster.replicas[0].name,
        dbname=dbname,
    )


def _wait_for_replica(cluster: PostgresCluster, dbname: str, note_id: str, title: str) -> None:
    reached = wait_until(
        lambda: _replica_title(cluster, dbname, note_id) == title, timeout_s=15, interval_s=0.05
    )
    assert reached is not None, f"the replica never showed {title!r}"


async def _cached_from_the_replica(
    cluster: PostgresCluster, dbname: str, http: httpx.AsyncClient, created: httpx.Response
) -> None:
    """Once the replica has the note, `http`'s node reads it there and caches it."""
    _wait_for_replica(cluster, dbname, created.json()["id"], created.json()["title"])
    url = created.headers["location"]
    assert (await http.get(url)).headers["x-read-source"].startswith("replica")
    assert (await http.get(url)).headers["x-read-source"] == "cache"


@pytest.mark.parametrize("stamps", [True, False], ids=["stamps", "broken-no-stamps"])
async def test_a_token_read_bypasses_older_entries_with_replay_paused(
    replicated, dbname, monkeypatch, stamps
):
    """B caches the note from the replica; replay stops; A changes the note;
    B, never told, reads with A's token 500 times: never the old note. A cache
    that ignores stamps serves the old note on the first try."""
    monkeypatch.setattr(store, "STAMPS", stamps)
    async with (
        node(replicated, dbname, "node-a") as (a, _),
        node(replicated, dbname, "node-b") as (b, _),
    ):
        created = await a.post("/v1/notes", json={"title": "v1"})
        url = created.headers["location"]
        await _cached_from_the_replica(replicated, dbname, b, created)
        with replay_paused(replicated):
            etag = (await a.get(url)).headers["etag"]
            patched = await a.patch(url, json={"title": "v2"}, headers={"If-Match": etag})
            token = patched.headers[consistency.HEADER]
            stale, sources = 0, set()
            for _ in range(500 if stamps else 1):  # bounded
                read = await b.get(url, headers={consistency.HEADER: token})
                assert read.status_code == 200, read.text
                stale += read.json()["title"] != "v2"
                sources.add(read.headers["x-read-source"])
    if stamps:
        assert stale == 0
        assert not any(s.startswith("replica") for s in sources), sources
    else:
        assert (stale, sources) == (1, {"cache"})


@pytest.mark.parametrize("tombstones", [True, False], ids=["tombstones", "broken-no-tombstones"])
async def test_a_fill_stamped_before_an_invalidation_does_not_bring_the_old_note_back(
    replicated, dbname, monkeypatch, tombstones
):
    """A changes the note while the replica is held back and B hears of it; B
    then reads (no token) from the replica, stamped before the write, and
    fills after the invalidation. Once the replica has caught up, B serves
    the new note; without tombstones its cache serves the old one."""
    monkeypatch.setattr(store, "TOMBSTONES", tombstones)
    async with (
        node(replicated, dbname, "node-a") as (a, _),
        node(replicated, dbname, "node-b") as (b, b_state),
    ):
        created = await a.post("/v1/notes", json={"title": "v1"})
        url = created.headers["location"]
        note_id = created.json()["id"]
        await _cached_from_the_replica(replicated, dbname, b, created)
        with replay_paused(replicated):
            etag = (await a.get(url)).headers["etag"]
            patched = await a.patch(url, json={"title": "v2"}, headers={"If-Match": etag})
            lsn = consistency.decode(patched.headers[consistency.HEADER])
            # What the bus would deliver: the key and the write's position.
            b_state["cache"].invalidate([f"notes/{note_id}"], lsn)
            racing = await b.get(url)
            # Without a token the replica may answer: old, but not from the cache.
            assert racing.headers["x-read-source"].startswith("replica")
            assert racing.json()["title"] == "v1"
        _wait_for_replica(replicated, dbname, note_id, "v2")
        read = await b.get(url)
    if tombstones:
        assert read.json()["title"] == "v2"
        assert b_state["cache"].stats()["refused"] >= 1
    else:
        assert (read.json()["title"], read.headers["x-read-source"]) == ("v1", "cache")
