"""The bus between real node processes: how fast one node sees another die, freeze,
leave, and come back, in its /healthz; and a bounded exit next to a peer that never reads.

One observer node runs for the module; each test starts the other node (same
bus port every time, so the observer's peer list stays valid) and does
something to it by its PID. Default bus timings: heartbeat 1 s, SUSPECT after
3 s, DEAD after 10 s.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from deploy.lab.node import Node
from deploy.lab.postgres import free_port
from deploy.lab.watch import FleetView
from tests.support import wait_until

pytestmark = pytest.mark.cluster


def _bus_env(name: str, data: Path, port: int, peers: list[int]) -> dict[str, str]:
    return {
        "CATTLE_DATA_DIR": str(data / name),
        "CATTLE_BUS_BIND": f"tcp://127.0.0.1:{port}",
        "CATTLE_BUS_PEERS": ",".join(f"tcp://127.0.0.1:{p}" for p in peers),
        "CATTLE_ACCESS_LOG": "false",
    }


class Pair:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.observer_port, self.peer_port = free_port(), free_port()
        self.observer = Node(
            base / "observer.log",
            name="observer",
            env=_bus_env("observer", base, self.observer_port, [self.peer_port]),
        )
        self.peers: list[Node] = []

    def start_peer(self, **env: str) -> Node:
        for earlier in self.peers:  # the bus port is the same every time
            earlier.send_signal(signal.SIGCONT)
            earlier.kill()
        node = Node(
            self.base / f"peer{len(self.peers)}.log",
            name="peer",
            env=_bus_env("peer", self.base, self.peer_port, [self.observer_port]) | env,
        )
        self.peers.append(node)
        node.start(timeout_s=60)
        assert wait_until(lambda: self.seen() == ("alive", "up"), timeout_s=10) is not None, (
            self.bus()
        )
        return node

    def bus(self) -> dict[str, Any]:
        try:
            reply = self.observer.get("/healthz", timeout_s=1.0)
        except OSError:
            return {}
        bus: dict[str, Any] = json.loads(reply.body).get("bus") or {}
        return bus

    def seen(self) -> tuple[str | None, str | None]:
        """The peer's (state, link) as the observer shows them."""
        peer = self.bus().get("peers", {}).get("peer")
        return (None, None) if peer is None else (peer["state"], peer["link"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    pair = Pair(tmp_path_factory.mktemp("bus"))
    pair.observer.start(timeout_s=60)
    try:
        yield pair
    finally:
        for node in [pair.observer, *pair.peers]:
            node.send_signal(signal.SIGCONT)
            node.kill()
            print(f"===== log of {node.name} (pid {node.pid}, exit {node.returncode})")
            print(node.log_tail(30))


def test_the_observer_shows_its_endpoint_and_the_peer(pair: Pair) -> None:
    pair.start_peer()
    bus = pair.bus()
    assert bus["endpoint"] == f"tcp://127.0.0.1:{pair.observer_port}"
    assert bus["peers"]["peer"]["lifecycle"] == "ready"
    assert bus["connections"] == {f"tcp://127.0.0.1:{pair.peer_port}": "up"}
    # The node logs where it publishes, so an ephemeral port can be found too.
    assert f"publishing on tcp://127.0.0.1:{pair.observer_port}" in pair.observer.log_text()


def test_a_killed_peer_is_link_down_at_once_suspect_within_4s_dead_within_11s(
    pair: Pair,
) -> None:
    peer = pair.start_peer()
    peer.kill()  # SIGKILL: no drain, no bye
    killed = time.monotonic()
    assert wait_until(lambda: pair.seen()[1] == "down", timeout_s=1.0, interval_s=0.02) is not None
    suspect = wait_until(lambda: pair.seen()[0] == "suspect", timeout_s=4.5, interval_s=0.05)
    assert suspect is not None, pair.bus()
    assert time.monotonic() - killed <= 4.0 + 0.1  # the poll's own resolution
    dead = wait_until(lambda: pair.seen()[0] == "dead", timeout_s=11.0, interval_s=0.05)
    assert dead is not None, pair.bus()
    assert time.monotonic() - killed <= 11.0 + 0.1


def test_a_stopped_peer_is_suspect_within_4s_and_alive_within_1s_of_continuing(
    pair: Pair,
) -> None:
    peer = pair.start_peer()
    assert peer.pid is not None
    peer.send_signal(signal.SIGSTOP)  # frozen: its TCP connections stay open, no FIN
    try:
        assert wait_until(lambda: pair.seen()[0] == "suspect", timeout_s=4.0, interval_s=0.05)
    finally:
        peer.send_signal(signal.SIGCONT)
    resumed = wait_until(lambda: pair.seen()[0] == "alive", timeout_s=1.0, interval_s=0.02)
    assert resumed is not None, pair.bus()
    peer.kill()


def test_a_terminated_peer_is_draining_within_100ms_then_left_never_dead(pair: Pair) -> None:
    peer = pair.start_peer(CATTLE_DRAIN_DELAY_S="1", CATTLE_SHUTDOWN_TIMEOUT_S="2")
    states: list[str | None] = []

    def seen_state(wanted: str) -> bool:
        state = pair.seen()[0]
        states.append(state)
        return state == wanted

    peer.send_signal(signal.SIGTERM)
    draining = wait_until(lambda: seen_state("draining"), timeout_s=2.0, interval_s=0.002)
    assert draining is not None, states
    assert draining < 0.1, f"DRAINING seen after {draining * 1000:.0f} ms"
    assert wait_until(lambda: seen_state("left"), timeout_s=10.0, interval_s=0.05) is not None
    assert peer.wait(10) == 0
    # Long after its exit, past SUSPECT and DEAD timings: still LEFT.
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        seen_state("left")
        time.sleep(0.1)
    assert "dead" not in states and "suspect" not in states, states
    assert states[-1] == "left"


def test_sigterm_exits_in_time_next_to_a_peer_that_never_reads(pair: Pair) -> None:
    # A subscriber that connects to the node's PUB and never reads, and a
    # "peer" that accepts the node's connection and never says a word.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    context = zmq.Context()
    reader = context.socket(zmq.SUB)
    reader.setsockopt(zmq.LINGER, 0)
    reader.setsockopt(zmq.RCVHWM, 1)
    reader.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        node = pair.start_peer(
            CATTLE_DRAIN_DELAY_S="0.5",
            CATTLE_SHUTDOWN_TIMEOUT_S="2",
            CATTLE_BUS_PEERS=f"tcp://127.0.0.1:{pair.observer_port},"
            f"tcp://127.0.0.1:{silent.getsockname()[1]}",
        )
        reader.connect(f"tcp://127.0.0.1:{pair.peer_port}")
        time.sleep(2.5)  # heartbeats queue up for the reader
        sent = time.monotonic()
        node.send_signal(signal.SIGTERM)
        code = node.wait(0.5 + 2 + 1)
        assert code == 0, node.log_tail()
        assert time.monotonic() - sent <= 0.5 + 2 + 1
    finally:
        reader.close()
        context.term()
        silent.close()


def test_the_lab_watch_reads_the_fleet_from_heartbeats_alone(pair: Pair) -> None:
    peer = pair.start_peer(CATTLE_DRAIN_DELAY_S="1", CATTLE_SHUTDOWN_TIMEOUT_S="2")
    view = FleetView([f"tcp://127.0.0.1:{p}" for p in (pair.observer_port, pair.peer_port)])
    try:
        # A SUB-only client: no HTTP request to any node, only their heartbeats.
        for _ in range(30):
            view.poll(0.1)
            if view.state_of("observer") == "ready" and view.state_of("peer") == "ready":
                break
        assert view.state_of("observer") == "ready" and view.state_of("peer") == "ready"
        assert "in_flight" in view.nodes["peer"].status and "rps" in view.nodes["peer"].status
        peer.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        while view.state_of("peer") != "draining" and time.monotonic() - sent < 2:
            view.poll(0.005)
        assert time.monotonic() - sent < 0.1 + 0.01, view.state_of("peer")
        # After its goodbye the view shows it gone (the bus calls it LEFT).
        while view.state_of("peer") != "gone" and time.monotonic() - sent < 10:
            view.poll(0.05)
        assert view.state_of("peer") == "gone"
    finally:
        view.close()
