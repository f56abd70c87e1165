"""The node bus: ZeroMQ PUB/SUB between nodes, no broker, for invalidations and heartbeats.

Infrastructure: it knows no domain and no cache. What it offers the cache
is the `InvalidationSink` contract and `Bus.publish_invalidations`; what it
offers people is the fleet's membership (in /healthz and the lab's `watch`).
Correctness never depends on a message arriving: a receiver that detects a
loss tells its sinks to drop what might be stale (membership.py).
"""

from service.bus.bus import Bus, BusRefused, InvalidationSink, StatsProvider
from service.bus.membership import Loss, PeerState

__all__ = ["Bus", "BusRefused", "InvalidationSink", "Loss", "PeerState", "StatsProvider"]
