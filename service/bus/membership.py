"""Who is on the bus: each peer's state from what it sent, and loss from its sequence numbers.

Any message counts as a sign of life. A peer is SUSPECT after
`bus_suspect_after_s` of silence, DEAD after `bus_dead_after_s`, DRAINING
while its heartbeats say it drains or stops, LEFT after its `bye` (a peer
that said goodbye is never DEAD). DEAD and LEFT peers are forgotten after a
while, so a fleet that churns does not grow the table.

Silence is measured net of this node's own event-loop stalls (the Lifeguard
idea): when the loop was held for 300 ms, its peers' messages waited in the
socket for those 300 ms, and that wait is not their silence. The membership
tick measures how late it woke and keeps that lateness out of the clock
every silence is measured on.

Sequence numbers tell what was missed: from one sender and one epoch, `seq`
rises by one per message. A jump is a gap (messages lost); a first message
above 1 from an unknown sender is a late join (its earlier messages were
never seen); a new epoch from a known sender is a restart. Each is a `Loss`,
on which the bus drops cache entries older than the header's LSN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from service.bus.messages import BYE, HB, Header

log = logging.getLogger("service.bus")

# Test-only switches, like idempotency's LOCKING: False turns the behaviour
# off, so the tests that show it works can also show what breaks without it.
NET_OF_STALLS = True  # measure silence net of this node's loop stalls
DETECT_LOSS = True  # report gaps, late joins and restarts


class PeerState(StrEnum):
    alive = "alive"
    suspect = "suspect"
    dead = "dead"
    draining = "draining"
    left = "left"


class Loss(StrEnum):
    """Why messages of a peer may have been missed."""

    gap = "gap"  # seq jumped
    late_join = "late_join"  # first message seen has seq > 1
    new_epoch = "new_epoch"  # the peer restarted


# A peer's heartbeat `state` values that make it DRAINING here.
_LEAVING = frozenset({"draining", "stopping", "stopped"})


@dataclass
class Peer:
    node: str
    epoch: int
    last_seq: int
    heard_at: float  # on the membership's net clock
    state: PeerState = PeerState.alive
    changed_at: float = 0.0  # on the plain clock (the membership's `clock`)
    endpoint: str | None = None  # the bus endpoint it says it bound
    status: Mapping[str, Any] = field(default_factory=dict)  # its last heartbeat body
    gaps: int = 0  # losses seen from it (every kind)

    @property
    def lifecycle(self) -> str | None:
        value = self.status.get("state")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Verdict:
    fresh: bool  # False: a duplicate or an old message, to be dropped
    loss: Loss | None = None
    # With a loss: the first seq of this epoch that was missed (the rest up to
    # the message's own), or None when earlier messages may be missing too
    # (a restart without a goodbye: the old epoch's last ones).
    missed_from: int | None = None


Transition = Callable[[Peer, PeerState, PeerState], None]


class Membership:
    """The peer table of one bus. Not thread-safe: the event loop's thread only."""

    def __init__(
        self,
        *,
        own_node: str,
        suspect_after_s: float,
        dead_after_s: float,
        forget_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.own_node = own_node
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.forget_after_s = (
            forget_after_s if forget_after_s is not None else max(60.0, 3 * dead_after_s)
        )
        self.clock = clock
        self.peers: dict[str, Peer] = {}
        self.stalled_s = 0.0  # this node's own loop stalls, summed
        self.transitions: list[Transition] = []

    # -- the clock silences are measured on -------------------------------

    def stalled(self, seconds: float) -> None:
        """Record that this node's loop was held for `seconds` (measured by the tick)."""
        if seconds > 0:
            self.stalled_s += seconds

    def now(self) -> float:
        return self.clock() - (self.stalled_s if NET_OF_STALLS else 0.0)

    # -- messages --------------------------------------------------------------

    def heard(self, topic: bytes, header: Header, body: Mapping[str, Any]) -> Verdict:
        """Account for one message; whether to apply it, and what was lost before it."""
        now = self.now()
        peer = self.peers.get(header.node)
        loss: Loss | None = None
        missed_from: int | None = None
        if peer is None:
            peer = Peer(header.node, header.epoch, header.seq, now, changed_at=self.clock())
            self.peers[header.node] = peer
            if header.seq != 1:
                loss, missed_from = Loss.late_join, 1
            log.info("bus: peer %s joined (seq %d)", header.node, header.seq)
        elif header.epoch != peer.epoch:
            # A restart. An older epoch arriving late (reordered across a
            # reconnect) would be a restart too; epochs are random, so the
            # newest message wins, which is the one that reached us last.
            # After its goodbye the old epoch is complete (a gap before the
            # goodbye was a loss of its own); without one, its last
            # messages may never have come.
            loss = Loss.new_epoch
            missed_from = 1 if peer.state is PeerState.left else None
            peer.epoch, peer.last_seq = header.epoch, header.seq
            peer.status = {}
            self._move(peer, PeerState.alive)
        elif header.seq <= peer.last_seq:
            return Verdict(fresh=False)
        else:
            if header.seq != peer.last_seq + 1:
                loss, missed_from = Loss.gap, peer.last_seq + 1
            peer.last_seq = header.seq
        peer.heard_at = now
        if topic == HB:
            peer.status = body
            endpoint = body.get("endpoint")
            if isinstance(endpoint, str):
                peer.endpoint = endpoint
        if topic == BYE:
            self._move(peer, PeerState.left)
        elif peer.state is not PeerState.left:
            self._move(peer, self._serving_state(peer))
        if loss is not None:
            peer.gaps += 1
            if not DETECT_LOSS:
                loss = None
        return Verdict(fresh=True, loss=loss, missed_from=missed_from)

    def _serving_state(self, peer: Peer) -> PeerState:
        return PeerState.draining if peer.lifecycle in _LEAVING else PeerState.alive

    # -- silence ---------------------------------------------------------------

    def tick(self) -> None:
        """Promote silent peers to SUSPECT and DEAD; forget long-gone ones."""
        now = self.now()
        wall = self.clock()
        for node, peer in list(self.peers.items()):
            if peer.state in (PeerState.dead, PeerState.left):
                if wall - peer.changed_at > self.forget_after_s:
                    del self.peers[node]
                continue
            silent_s = now - peer.heard_at
            if silent_s >= self.dead_after_s:
                self._move(peer, PeerState.dead)
            elif silent_s >= self.suspect_after_s:
                self._move(peer, PeerState.suspect)

    def _move(self, peer: Peer, new: PeerState) -> None:
        old = peer.state
        if new is old:
            return
        peer.state = new
        peer.changed_at = self.clock()
        level = logging.WARNING if new in (PeerState.suspect, PeerState.dead) else logging.INFO
        log.log(level, "bus: peer %s %s -> %s", peer.node, old, new)
        for listener in self.transitions:
            listener(peer, old, new)

    def silent_s(self, peer: Peer) -> float:
        return max(0.0, self.now() - peer.heard_at)

    def counts(self) -> dict[PeerState, int]:
        counts = dict.fromkeys(PeerState, 0)
        for peer in self.peers.values():
            counts[peer.state] += 1
        return counts
