"""Lost invalidations cost freshness within a bound, never correctness.

Three nodes (apps in this process, each with its own real bus on loopback)
share one SQLite file. Node A rewrites one note every 100 ms; node B reads
it over and over without a token, node C with A's latest token. B's and C's
caches drop a share of the invalidations their buses deliver (all of them, then one in ten), after
the bus has counted them: a loss the bus cannot see. A token-less read on B
is then never staler than the cache's TTL (SQLite has no replicas, so no lag
bound is added), and a read with A's token is never stale at all.

The control runs the same with a 30 s TTL: B serves old notes for far longer
than the bound, so the measurement can see staleness when there is some.

A loss the bus can see: one `inv` message lost on B's wire (before B reads
its header) leaves a gap in A's sequence numbers, which the next message from
A shows; B then drops every entry older than that message's LSN, and its
next read misses, within a heartbeat. The control turns loss detection off:
with a 30 s TTL, B keeps answering the old note.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from deploy.lab.postgres import free_port
from service.app import create_app
from service.bus import membership
from service.bus.membership import Loss
from tests.conftest import serve_asgi
from tests.notes.test_cache import node_settings

TTL_S = 0.5
# Scheduling slack on one event loop shared by both nodes and the client.
MARGIN_S = 0.25
WRITES = 30
WRITE_EVERY_S = 0.1


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "cattle.db"
    path.write_bytes(sqlite_template.read_bytes())
    return f"sqlite+aiosqlite:///{path}"


@contextlib.asynccontextmanager
async def fleet(url: str, tmp_path: Path, ttl_s: float) -> AsyncIterator[list[tuple]]:
    """Nodes a, b and c on one SQLite file, each bus connected to the other two."""
    names = ("a", "b", "c")
    ports = {name: free_port() for name in names}

    def settings(name: str):  # type: ignore[no-untyped-def]
        return node_settings(url, tmp_path / name, cache_ttl_s=ttl_s).model_copy(
            update={
                "node_id": name,
                "bus": True,
                "bus_bind": f"tcp://127.0.0.1:{ports[name]}",
                "bus_peers": [f"tcp://127.0.0.1:{ports[n]}" for n in names if n != name],
            }
        )

    async with (
        serve_asgi(create_app(settings("a"))) as a,
        serve_asgi(create_app(settings("b"))) as b,
        serve_asgi(create_app(settings("c"))) as c,
    ):
        yield [a, b, c]


def drop_invalidations(state: dict, share: float, rng: random.Random) -> list[int]:
    """Make B's cache ignore `share` of the invalidations its bus hands it."""
    cache = state["cache"]  # what the lifespan started, as every request gets it
    apply = cache.invalidate
    counts = [0, 0]  # delivered, dropped

    def lossy(keys: Sequence[str], lsn: int | None) -> None:
        counts[0] += 1
        if rng.random() < share:
            counts[1] += 1
            return
        apply(keys, lsn)

    cache.invalidate = lossy  # type: ignore[method-assign]
    return counts


async def run(url: str, tmp_path: Path, *, ttl_s: float, drop: float) -> dict[str, float]:
    async with fleet(url, tmp_path, ttl_s) as [(a, _), (b, b_state), (c, c_state)]:
        # B serves the token-less reads, C the ones with tokens: a token read
        # refills the cache with the newer note, which would hide B's staleness.
        counts = drop_invalidations(b_state, drop, random.Random(7))
        drop_invalidations(c_state, drop, random.Random(8))
        created = await a.post("/v1/notes", json={"title": "0"})
        note = created.headers["location"]
        etag = created.headers["etag"]
        token = created.headers["consistency-token"]
        committed: list[float] = [time.monotonic()]  # when version i was answered
        worst_stale_s = 0.0
        stale_with_token = 0
        reads = 0
        done = asyncio.Event()

        async def writer() -> None:
            nonlocal etag, token
            for version in range(1, WRITES + 1):  # bounded
                await asyncio.sleep(WRITE_EVERY_S)
                reply = await a.patch(
                    note, json={"title": str(version)}, headers={"If-Match": etag}
                )
                assert reply.status_code == 200, reply.text
                etag, token = reply.headers["etag"], reply.headers["consistency-token"]
                committed.append(time.monotonic())
            done.set()

        async def reader() -> None:
            nonlocal worst_stale_s, stale_with_token, reads
            while not done.is_set():  # bounded by the writer's 30 writes
                started = time.monotonic()
                known = len(committed) - 1  # newest version answered before this read
                seen = int((await b.get(note)).json()["title"])
                if seen < known:  # version seen+1 was answered at committed[seen+1]
                    worst_stale_s = max(worst_stale_s, started - committed[seen + 1])
                sent_token, newest = token, len(committed) - 1
                with_token = await c.get(note, headers={"Consistency-Token": sent_token})
                stale_with_token += int(with_token.json()["title"]) < newest
                reads += 2
                await asyncio.sleep(0.01)

        await asyncio.wait_for(asyncio.gather(writer(), reader()), timeout=60)
        print(
            f"ttl {ttl_s} s, drop {drop:.0%}: {counts[1]} of {counts[0]} invalidations dropped, "
            f"{reads} reads, worst token-less staleness {worst_stale_s:.3f} s, "
            f"{stale_with_token} stale with the token"
        )
        return {
            "delivered": counts[0],
            "dropped": counts[1],
            "worst_stale_s": worst_stale_s,
            "stale_with_token": stale_with_token,
        }


@pytest.mark.parametrize("drop", [1.0, 0.1], ids=["all-lost", "one-in-ten-lost"])
async def test_lost_invalidations_stay_within_the_ttl_and_tokens_stay_exact(
    sqlite_url, tmp_path, drop
):
    seen = await run(sqlite_url, tmp_path, ttl_s=TTL_S, drop=drop)
    assert seen["delivered"] >= WRITES // 2, "the bus delivered too few invalidations to judge"
    assert seen["dropped"] > 0
    assert seen["worst_stale_s"] <= TTL_S + MARGIN_S
    assert seen["stale_with_token"] == 0


async def test_control_a_long_ttl_shows_the_staleness_lost_invalidations_cause(
    sqlite_url, tmp_path
):
    seen = await run(sqlite_url, tmp_path, ttl_s=30.0, drop=1.0)
    assert seen["worst_stale_s"] > 1.0  # the writes span 3 s; B kept the first copy
    assert seen["stale_with_token"] == 0


def drop_one_invalidation_on_the_wire(bus) -> list[int]:  # type: ignore[no-untyped-def]
    """Make `bus` lose the next `inv` message before it reads its header, as a
    full socket or a lost connection would: the next message shows the gap."""
    handle = bus._handle
    dropped: list[int] = []

    def lossy(frames) -> None:  # type: ignore[no-untyped-def]
        if not dropped and frames[0].bytes == b"inv":
            dropped.append(1)
            return
        handle(frames)

    bus._readers = [(sock, lossy if reader == handle else reader) for sock, reader in bus._readers]
    return dropped


async def stale_seconds_after_one_lost_invalidation(url: str, tmp_path: Path) -> tuple[float, dict]:
    """B caches a note, loses the invalidation of A's next write of it; how long
    B answers the old version (TTL 30 s: only the bus can make it fresh)."""
    async with fleet(url, tmp_path, ttl_s=30.0) as [(a, _), (b, b_state), _c]:
        created = await a.post("/v1/notes", json={"title": "old"})
        note = created.headers["location"]
        bus = b_state["bus"]
        heard_by = time.monotonic() + 3.0  # a heartbeat a second
        while {"a", "c"} - set(bus.membership.peers) and time.monotonic() < heard_by:  # bounded
            await asyncio.sleep(0.02)
        # B has heard A and C: a message lost now is a gap, and no first
        # message of a late joiner will empty B's cache during the measurement.
        assert {"a", "c"} <= set(bus.membership.peers)
        assert (await b.get(note)).headers["x-read-source"] != "cache"  # a miss fills it
        assert (await b.get(note)).headers["x-read-source"] == "cache"
        dropped = drop_one_invalidation_on_the_wire(bus)
        written = await a.patch(
            note, json={"title": "new"}, headers={"If-Match": created.headers["etag"]}
        )
        assert written.status_code == 200
        answered = time.monotonic()
        deadline = answered + 3.0  # heartbeats come every second
        while time.monotonic() < deadline:  # bounded
            if (await b.get(note)).json()["title"] == "new":
                break
            await asyncio.sleep(0.02)
        return time.monotonic() - answered, {"dropped": len(dropped), **b_state["bus"].losses}


async def test_one_invalidation_lost_on_the_wire_is_a_gap_and_the_next_read_misses(
    sqlite_url, tmp_path
):
    stale_s, seen = await stale_seconds_after_one_lost_invalidation(sqlite_url, tmp_path)
    assert seen["dropped"] == 1
    assert seen[Loss.gap] == 1  # the next message from A (a heartbeat) showed the gap
    # Within a heartbeat interval (1 s, jittered) and scheduling slack, not the 30 s TTL.
    assert stale_s < 1.5


async def test_control_without_loss_detection_the_lost_invalidation_leaves_b_stale(
    sqlite_url, tmp_path, monkeypatch
):
    monkeypatch.setattr(membership, "DETECT_LOSS", False)
    stale_s, seen = await stale_seconds_after_one_lost_invalidation(sqlite_url, tmp_path)
    assert seen["dropped"] == 1
    assert stale_s >= 3.0  # still the old note when the bounded wait ended
