"""The read cache on the notes read-by-id path, through the app on SQLite.

Two apps on one SQLite file stand for two nodes sharing it; no bus connects
them, so any invalidation between them is "lost" and only stamps and tokens
keep reads right.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import service
from service.app import create_app
from service.cache import store
from service.config import Settings
from tests.conftest import serve_asgi

# Headers that legitimately differ between two responses of the same content.
_VARYING = {"date", "x-read-source"}


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "cattle.db"
    path.write_bytes(sqlite_template.read_bytes())
    return f"sqlite+aiosqlite:///{path}"


def node_settings(url: str, tmp_path: Path, **extra) -> Settings:
    return Settings(
        database_url=url,
        data_dir=tmp_path,
        node_id="test-node",
        environment="production",
        cursor_secret="test-cursor-secret-0123456789",
        bus=False,
        **extra,
    )


@contextlib.asynccontextmanager
async def node(url: str, tmp_path: Path, **extra) -> AsyncIterator[tuple[httpx.AsyncClient, dict]]:
    async with serve_asgi(create_app(node_settings(url, tmp_path, **extra))) as (http, state):
        yield http, state


def _seen(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k not in _VARYING}
    return response.status_code, headers, response.content


async def test_a_second_read_is_a_cache_hit_with_the_same_answer(sqlite_url, tmp_path):
    async with node(sqlite_url, tmp_path) as (http, state):
        url = (await http.post("/v1/notes", json={"title": "t", "body": "b"})).headers["location"]
        first = await http.get(url)
        second = await http.get(url)
        assert first.headers["x-read-source"] == "primary"
        assert second.headers["x-read-source"] == "cache"
        assert _seen(second) == _seen(first)
        etag = first.headers["etag"]
        not_modified = await http.get(url, headers={"If-None-Match": etag})
        assert not_modified.status_code == 304
        assert not_modified.headers["etag"] == etag
        assert not_modified.headers["x-read-source"] == "cache"
        head = await http.head(url)
        assert (head.status_code, head.headers["x-read-source"]) == (200, "cache")
        assert state["cache"].stats()["hits"] == 3


async def test_patch_and_delete_invalidate_before_they_answer(sqlite_url, tmp_path):
    async with node(sqlite_url, tmp_path) as (http, _):
        url = (await http.post("/v1/notes", json={"title": "t"})).headers["location"]
        etag = (await http.get(url)).headers["etag"]
        assert (await http.get(url)).headers["x-read-source"] == "cache"
        patched = await http.patch(url, json={"title": "new"}, headers={"If-Match": etag})
        assert patched.status_code == 200
        read = await http.get(url)  # no token: only the invalidation keeps this right
        assert (read.json()["title"], read.headers["etag"]) == ("new", '"2"')
        assert (await http.get(url)).headers["x-read-source"] == "cache"
        assert (await http.delete(url)).status_code == 204
        gone = await http.get(url)
        assert gone.status_code == 404
        assert gone.headers["x-read-source"] == "primary"  # a 404 is never cached


async def test_cache_off_answers_exactly_alike_minus_the_read_source(sqlite_url, tmp_path):
    """The same requests against one file, through a node with the cache and one
    without: every status, header and body is the same, X-Read-Source aside."""
    async with (
        node(sqlite_url, tmp_path) as (cached, _),
        node(sqlite_url, tmp_path, cache=False) as (plain, plain_state),
    ):
        assert plain_state["cache"] is None
        url = (await cached.post("/v1/notes", json={"title": "t", "body": "b"})).headers["location"]
        missing = url[:-12] + "000000000000"
        etag = '"1"'
        requests = [
            ("GET", url, {}),
            ("GET", url, {}),  # a hit on the cached node
            ("GET", url, {"If-None-Match": etag}),
            ("GET", url, {"If-None-Match": '"7", W/"1"'}),
            ("GET", url, {"If-None-Match": '"7"'}),
            ("HEAD", url, {}),
            ("GET", missing, {}),
            ("GET", url, {"If-None-Match": "nonsense"}),
        ]
        sources = set()
        for method, target, headers in requests:
            on = await cached.request(method, target, headers=headers)
            off = await plain.request(method, target, headers=headers)
            assert _seen(on) == _seen(off), (method, target, headers)
            sources.add(on.headers.get("x-read-source"))
            assert off.headers.get("x-read-source") != "cache"
        assert "cache" in sources
        # What the scale-out report reads: the cache's counters, absent when it is off.
        counted = (await cached.get("/metrics")).text
        assert re.search(rf"^{service.NAME}_cache_hits_total [1-9]", counted, re.M), counted
        assert f"{service.NAME}_cache_" not in (await plain.get("/metrics")).text


@pytest.mark.parametrize("stamps", [True, False], ids=["stamps", "broken-no-stamps"])
async def test_a_token_read_on_another_node_is_never_stale(
    sqlite_url, tmp_path, monkeypatch, stamps
):
    """Node A writes, node B holds the old note and never hears of the write:
    B with A's token reads the new note (without stamps, it serves the old one)."""
    monkeypatch.setattr(store, "STAMPS", stamps)
    async with (
        node(sqlite_url, tmp_path, cache_ttl_s=60) as (a, _),
        node(sqlite_url, tmp_path, cache_ttl_s=60) as (b, _),
    ):
        created = await a.post("/v1/notes", json={"title": "v1"})
        url = created.headers["location"]
        assert (await b.get(url)).headers["x-read-source"] == "primary"
        assert (await b.get(url)).headers["x-read-source"] == "cache"
        stale = 0
        for round_ in range(5):  # bounded: five writes, each read back at once
            etag = (await a.get(url)).headers["etag"]
            patched = await a.patch(
                url, json={"title": f"v{round_ + 2}"}, headers={"If-Match": etag}
            )
            token = patched.headers["consistency-token"]
            read = await b.get(url, headers={"Consistency-Token": token})
            stale += read.json()["title"] != f"v{round_ + 2}"
        if stamps:
            assert stale == 0
        else:
            assert stale == 5


async def test_sqlite_tokens_order_commits_across_nodes(sqlite_url, tmp_path):
    """Tokens are the commit counter: they rise with every write, whichever node made it."""
    async with (
        node(sqlite_url, tmp_path) as (a, _),
        node(sqlite_url, tmp_path) as (b, _),
    ):
        tokens = []
        for http in (a, b, a, b):
            created = await http.post("/v1/notes", json={"title": "t"})
            tokens.append(int(created.headers["consistency-token"].removeprefix("w1."), 16))
        assert tokens == sorted(tokens)
        assert len(set(tokens)) == 4


async def test_metrics_count_hits_misses_and_entries(sqlite_url, tmp_path):
    async with node(sqlite_url, tmp_path) as (http, _):
        url = (await http.post("/v1/notes", json={"title": "t"})).headers["location"]
        for _ in range(3):
            await http.get(url)
        exposed = (await http.get("/metrics")).text
    found = {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposed)
        for sample in family.samples
    }
    prefix = f"{service.NAME}_cache"
    assert found[f"{prefix}_hits_total"] == 2
    assert found[f"{prefix}_misses_total"] == 1
    assert found[f"{prefix}_refused_total"] == 0
    assert found[f"{prefix}_evictions_total"] == 0
    assert found[f"{prefix}_entries"] == 1
