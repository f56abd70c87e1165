"""The read cache and the bus together, on two real nodes sharing one SQLite file.

Node B caches a note; node A changes it. With the bus, B's cached copy is
dropped as soon as A's invalidation arrives, and B's next token-less read
shows the change. The control runs the same steps with CATTLE_BUS=off: B
keeps answering the old note from its cache until the entry's TTL (set long
here, 30 s, so the difference cannot be a TTL running out).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab.node import Node, Reply
from deploy.lab.postgres import free_port
from tests.support import wait_until

pytestmark = pytest.mark.cluster

TTL_S = 30.0
# Well inside the TTL: the bus delivers in milliseconds on loopback.
FRESH_WITHIN_S = 2.0


def _start_pair(base: Path, *, bus: bool) -> tuple[Node, Node]:
    ports = {"a": free_port(), "b": free_port()}
    nodes = []
    for name, other in (("a", "b"), ("b", "a")):
        env = {
            "CATTLE_DATA_DIR": str(base / "shared"),  # one SQLite file for both
            "CATTLE_NODE_ID": name,
            "CATTLE_CACHE_TTL_S": str(TTL_S),
            "CATTLE_BUS": "true" if bus else "false",
            "CATTLE_BUS_BIND": f"tcp://127.0.0.1:{ports[name]}",
            "CATTLE_BUS_PEERS": f"tcp://127.0.0.1:{ports[other]}",
            "CATTLE_ACCESS_LOG": "false",
        }
        node = Node(base / f"{name}.log", name=name, env=env)
        nodes.append(node)
        node.start(timeout_s=60)  # one after the other: the first one migrates
    return nodes[0], nodes[1]


@pytest.fixture(params=[True, False], ids=["bus", "no-bus-control"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Node, Node, bool]]:
    bus: bool = request.param
    a: Node | None = None
    b: Node | None = None
    try:
        a, b = _start_pair(tmp_path, bus=bus)
        if bus:  # each has heard the other before the test writes
            heard = wait_until(lambda: _peer_alive(a, "b") and _peer_alive(b, "a"), timeout_s=10)
            assert heard is not None, "the two nodes did not see each other on the bus"
        yield a, b, bus
    finally:
        for node in (a, b):
            if node is not None:
                node.kill()
                print(f"===== log of {node.name}")
                print(node.log_tail(30))


def _peer_alive(node: Node, peer: str) -> bool:
    bus = json.loads(node.get("/healthz").body).get("bus") or {}
    return bool(bus.get("peers", {}).get(peer, {}).get("state") == "alive")


def _json(method: str, node: Node, path: str, body: object, **headers: str) -> Reply:
    return node.request(
        method,
        path,
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )


def test_a_write_on_one_node_drops_the_cached_copy_on_the_other(
    pair: tuple[Node, Node, bool],
) -> None:
    a, b, bus = pair
    created = _json("POST", a, "/v1/notes", {"title": "before", "body": "x"})
    assert created.status == 201, created.text
    path = created.headers["location"]

    assert b.get(path).status == 200  # fills B's cache
    cached = b.get(path)
    assert cached.headers.get("x-read-source") == "cache", cached.headers
    assert json.loads(cached.body)["title"] == "before"

    changed = _json("PATCH", a, path, {"title": "after"}, **{"If-Match": created.headers["etag"]})
    assert changed.status == 200, changed.text

    def b_title() -> str:
        return str(json.loads(b.get(path).body)["title"])

    seen = wait_until(lambda: b_title() == "after", timeout_s=FRESH_WITHIN_S, interval_s=0.02)
    if bus:
        assert seen is not None, f"B still served the old note {FRESH_WITHIN_S} s after the write"
        print(f"B saw the write after {seen:.3f} s")
    else:
        # The control: nothing told B, so its cache answers the old note.
        assert seen is None
        stale = b.get(path)
        assert stale.headers.get("x-read-source") == "cache"
        assert json.loads(stale.body)["title"] == "before"
        # With A's token B reads the write even so: the stamp rule, not the bus.
        token = changed.headers["consistency-token"]
        fresh = b.get(path, headers={"Consistency-Token": token})
        assert json.loads(fresh.body)["title"] == "after"
