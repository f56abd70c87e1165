"""What the bus costs its node when something goes wrong: its own loop stalls,
a subscriber that never reads (memory, and the close at shutdown).

Each runs the broken variant too, so the test shows what it guards against.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable

import pytest
import zmq

from service.bus import Bus, PeerState, membership
from service.bus.membership import Peer
from tests.bus.conftest import PeerProcess, StartBus, until

# Every test here runs a peer as a process of its own, and waits out stalls
# and floods of seconds: `make test` runs them, `make test-fast` does not.
pytestmark = pytest.mark.cluster

# The peer beats every 0.1 s, the observer suspects after 0.35 s of silence,
# and its loop stalls 0.4 s at a time: every stall is longer than the
# threshold, so only netting the stall out keeps the peer ALIVE.
STALL_S = 0.4
QUICK_PEER = {"CATTLE_BUS_HEARTBEAT_INTERVAL_S": "0.1"}
OBSERVER = {"bus_heartbeat_interval_s": 0.1, "bus_suspect_after_s": 0.35, "bus_dead_after_s": 3.0}


async def _stall_in_a_reader(seconds: float) -> None:
    """Hold the loop for `seconds` inside an I/O callback, as a heavy
    `data_received` would. uvloop then runs due timers, the bus's tick
    among them, before it reads the sockets that became readable meanwhile:
    the tick looks before the heartbeats that came during the stall are read.
    (A stall in a task step may be followed by the reads first, or not.)"""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    held: asyncio.Future[None] = loop.create_future()

    def stall() -> None:
        loop.remove_reader(ours.fileno())
        ours.recv(1)
        time.sleep(seconds)
        held.set_result(None)

    try:
        loop.add_reader(ours.fileno(), stall)
        theirs.send(b"x")
        await held
    finally:
        ours.close()
        theirs.close()


async def _suspicions_during_stalls(
    start_bus: StartBus, peer_process: Callable[..., PeerProcess]
) -> list[str]:
    peer = peer_process("p", env=QUICK_PEER)
    observer = await start_bus("me", bus_peers=[peer.endpoint], **OBSERVER)
    assert await until(lambda: "p" in observer.membership.peers, 5.0) is not None
    await asyncio.sleep(0.5)
    suspected: list[str] = []

    def record(peer: Peer, _old: PeerState, new: PeerState) -> None:
        if new in (PeerState.suspect, PeerState.dead):
            suspected.append(f"{peer.node} {new}")

    observer.membership.transitions.append(record)
    for _ in range(4):
        await _stall_in_a_reader(STALL_S)  # the observer's own loop is held
        await asyncio.sleep(0.8)
    return suspected


async def test_own_loop_stalls_make_no_false_suspect(
    start_bus: StartBus, peer_process: Callable[..., PeerProcess]
) -> None:
    assert await _suspicions_during_stalls(start_bus, peer_process) == []


async def test_counting_own_stalls_as_silence_suspects_a_healthy_peer(
    start_bus: StartBus, peer_process: Callable[..., PeerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "NET_OF_STALLS", False)
    assert await _suspicions_during_stalls(start_bus, peer_process) != []


# A subscriber that connects and never reads: 1000 messages of 8 KB a second
# for 6 s (48 MB) published at it. Two things bound what the publisher holds
# for it: the high-water mark, and the ZMTP heartbeat (its PING waits behind
# the unread data, no PONG comes back, and the connection is closed with its
# queue). The HWM tests switch the heartbeats off to see the HWM alone.
RATE = 1000
KEY_BYTES = 8000
HWM = 200
SECONDS = 6.0
SLACK_BYTES = 8 * 1024 * 1024  # allocator noise, one pipe's batching


def _flood_a_reader_that_never_reads(publisher: PeerProcess) -> tuple[int, dict[str, object]]:
    """RSS growth of the publisher over the flood, and its close report after it."""
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(publisher.endpoint)
    try:
        time.sleep(0.5)
        before = publisher.rss_bytes()
        publisher.go()
        time.sleep(SECONDS)
        grown = publisher.rss_bytes() - before
        report = publisher.terminate_and_report(timeout_s=15)
    finally:
        sub.close()
        context.term()
    return grown, report


def test_the_high_water_mark_bounds_memory_and_the_close_is_bounded(
    peer_process: Callable[..., PeerProcess],
) -> None:
    publisher = peer_process(
        "pub", "--rate", str(RATE), "--key-bytes", str(KEY_BYTES), "--hwm", str(HWM),
        "--linger-s", "0.5", "--close-timeout-s", "3", "--no-zmtp-heartbeats",
    )  # fmt: skip
    grown, report = _flood_a_reader_that_never_reads(publisher)
    bound = HWM * (KEY_BYTES + 200) + SLACK_BYTES
    assert grown <= bound, f"publisher grew {grown / 2**20:.1f} MiB, bound {bound / 2**20:.1f}"
    assert report["closed"] is True, report
    assert float(str(report["close_s"])) < 0.5 + 0.5, report


def test_without_a_high_water_mark_or_a_linger_the_publisher_grows_and_hangs(
    peer_process: Callable[..., PeerProcess],
) -> None:
    publisher = peer_process(
        "pub", "--rate", str(RATE), "--key-bytes", str(KEY_BYTES), "--hwm", "0",
        "--linger-s", "-1", "--close-timeout-s", "3", "--no-zmtp-heartbeats",
    )  # fmt: skip
    grown, report = _flood_a_reader_that_never_reads(publisher)
    bound = HWM * (KEY_BYTES + 200) + SLACK_BYTES
    assert grown > bound, f"publisher grew only {grown / 2**20:.1f} MiB without a HWM"
    assert report["closed"] is False, "LINGER -1 closed anyway: the test cannot tell"


def test_zmtp_heartbeats_alone_free_a_reader_that_never_reads(
    peer_process: Callable[..., PeerProcess],
) -> None:
    """The second bound: even with no HWM at all, the stuck connection is closed."""
    publisher = peer_process(
        "pub", "--rate", str(RATE), "--key-bytes", str(KEY_BYTES), "--hwm", "0",
        "--close-timeout-s", "3",
    )  # fmt: skip
    grown, report = _flood_a_reader_that_never_reads(publisher)
    assert grown <= HWM * (KEY_BYTES + 200) + SLACK_BYTES, f"grew {grown / 2**20:.1f} MiB"
    assert report["closed"] is True, report


# A frozen publisher sends no FIN: its subscriber's own ZMTP PINGs go
# unanswered, and the link goes down two to three suspect bounds (0.6 s
# here) after the freeze. The reconnect that follows a reconnect interval
# later reaches the frozen peer's kernel, which accepts it; with no handshake
# the link must stay down.
async def _link_down_after_a_freeze(
    start_bus: StartBus, peer_process: Callable[..., PeerProcess], *, stay_down_s: float = 0.0
) -> tuple[float | None, bool]:
    """(seconds until the link was down, or None; whether it then stayed down `stay_down_s`)."""
    peer = peer_process("p")
    observer = await start_bus("me", bus_peers=[peer.endpoint])
    assert await until(lambda: observer.links.get(peer.endpoint) == "up", 5.0) is not None
    peer.signal(signal.SIGSTOP)
    try:
        down_after_s = await until(lambda: observer.links.get(peer.endpoint) == "down", 3.0)
        if down_after_s is None:
            return None, False
        up_again = await until(lambda: observer.links.get(peer.endpoint) != "down", stay_down_s)
        return down_after_s, up_again is None
    finally:
        peer.signal(signal.SIGCONT)


async def test_a_frozen_publishers_link_goes_down_within_three_suspect_bounds_and_stays_down(
    start_bus: StartBus, peer_process: Callable[..., PeerProcess]
) -> None:
    down_after_s, stayed_down = await _link_down_after_a_freeze(
        start_bus,
        peer_process,
        stay_down_s=1.0,  # ten reconnect intervals
    )
    assert down_after_s is not None
    assert down_after_s < 3 * 0.6 + 0.5  # and scheduling slack
    assert stayed_down, "the link read up again while the peer was still frozen"


async def test_control_a_subscriber_that_sends_no_pings_keeps_a_frozen_link_up(
    start_bus: StartBus, peer_process: Callable[..., PeerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Bus, "_heartbeat_options", lambda self, sock: None)
    assert await _link_down_after_a_freeze(start_bus, peer_process) == (None, False)
