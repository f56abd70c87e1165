"""Membership on a clock the test turns: states from silence, heartbeats and goodbyes;
losses from sequence numbers."""

from __future__ import annotations

import pytest

from service.bus import membership
from service.bus.membership import Loss, Membership, PeerState
from service.bus.messages import BYE, HB, INV, Header


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> Membership:
    return Membership(own_node="me", suspect_after_s=3.0, dead_after_s=10.0, clock=clock)


def hb(seq: int, *, node: str = "p", epoch: int = 1, lsn: int | None = 9, state: str = "ready"):
    return HB, Header(node, epoch, seq, lsn, 0.0), {"state": state}


def inv(seq: int, *, node: str = "p", epoch: int = 1, lsn: int | None = 9):
    return INV, Header(node, epoch, seq, lsn, 0.0), {}


def test_in_order_messages_lose_nothing_and_duplicates_are_dropped(table: Membership) -> None:
    assert table.heard(*hb(1)).loss is None
    assert table.heard(*inv(2)).loss is None
    assert table.heard(*inv(2)).fresh is False
    assert table.heard(*hb(1)).fresh is False


def test_a_gap_a_late_join_and_a_new_epoch_are_losses(table: Membership) -> None:
    assert table.heard(*hb(5)).loss is Loss.late_join  # first seen, seq > 1
    assert table.heard(*inv(6)).loss is None
    assert table.heard(*inv(8)).loss is Loss.gap  # 7 never arrived
    assert table.heard(*hb(1, epoch=2)).loss is Loss.new_epoch  # restarted
    assert table.heard(*hb(2, epoch=2)).loss is None
    assert table.peers["p"].gaps == 3


def test_without_loss_detection_the_same_gaps_pass_unnoticed(
    table: Membership, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "DETECT_LOSS", False)
    assert table.heard(*hb(5)).loss is None
    assert table.heard(*inv(8)).loss is None


def test_silence_makes_a_peer_suspect_then_dead_and_a_message_brings_it_back(
    table: Membership, clock: Clock
) -> None:
    table.heard(*hb(1))
    clock.now += 2.9
    table.tick()
    assert table.peers["p"].state is PeerState.alive
    clock.now += 0.2
    table.tick()
    assert table.peers["p"].state is PeerState.suspect
    clock.now += 7.0
    table.tick()
    assert table.peers["p"].state is PeerState.dead
    table.heard(*hb(2))
    assert table.peers["p"].state is PeerState.alive


def test_a_draining_peer_is_draining_and_one_that_said_bye_is_left_never_dead(
    table: Membership, clock: Clock
) -> None:
    table.heard(*hb(1))
    table.heard(*hb(2, state="draining"))
    assert table.peers["p"].state is PeerState.draining
    table.heard(BYE, Header("p", 1, 3, 9, 0.0), {})
    assert table.peers["p"].state is PeerState.left
    for _ in range(30):
        clock.now += 1.0
        table.tick()
        assert table.peers["p"].state is PeerState.left
    clock.now += table.forget_after_s
    table.tick()
    assert "p" not in table.peers  # forgotten (measured on the monotonic clock)


def test_silence_is_measured_net_of_this_nodes_own_stalls(table: Membership, clock: Clock) -> None:
    table.heard(*hb(1))
    clock.now += 3.5
    table.stalled(1.0)  # 1 s of that was this node's loop held, not the peer silent
    table.tick()
    assert table.peers["p"].state is PeerState.alive


def test_counting_stalls_as_silence_makes_a_false_suspect(
    table: Membership, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "NET_OF_STALLS", False)
    table.heard(*hb(1))
    clock.now += 3.5
    table.stalled(1.0)
    table.tick()
    assert table.peers["p"].state is PeerState.suspect
