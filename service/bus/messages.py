"""The wire format of the node bus: topic, header and body, each one ZeroMQ frame.

Three frames per message, `[topic, header, body]`, the topic first so a SUB
filters on it without reading the rest. Header and body are JSON: a message
is a few hundred bytes, sent a few times a second per node, and its cost is
libzmq's and the event loop's, not the encoder's; JSON needs no dependency,
and an operator can read a captured frame. Readers ignore fields they do not
know, so a newer node can add some without breaking an older one; a header
whose major version `v` is unknown is dropped whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

VERSION = 1

INV = b"inv"  # keys a write changed, with the commit LSN
HB = b"hb"  # state and load, every heartbeat interval and on every lifecycle change
BYE = b"bye"  # the node is leaving on purpose
TOPICS = (INV, HB, BYE)

# Past this many keys an invalidation is split over several messages, so no
# message grows without bound in a burst of writes.
MAX_KEYS_PER_MESSAGE = 512


@dataclass(frozen=True, slots=True)
class Header:
    node: str  # the sender's node id
    epoch: int  # random per process start: a new one means the sender restarted
    seq: int  # 1, 2, 3... over every message the sender sends, whatever its topic
    lsn: int | None  # the newest commit LSN the sender knows (None: none yet)
    sent: float  # the sender's wall clock (time.time()) when it sent
    traceparent: str | None = None  # W3C trace context of the span that caused it
    # The seq of the sender's newest `inv` before this message, in this epoch
    # (0: none yet). A receiver that missed seqs a..b knows from it whether
    # an invalidation was among them. None: the sender does not say.
    last_inv: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    topic: bytes
    header: Header
    body: Mapping[str, Any]


def encode(topic: bytes, header: Header, body: Mapping[str, Any]) -> list[bytes]:
    head: dict[str, Any] = {
        "v": VERSION,
        "node": header.node,
        "epoch": header.epoch,
        "seq": header.seq,
        "lsn": header.lsn,
        "sent": header.sent,
    }
    if header.traceparent:
        head["traceparent"] = header.traceparent
    if header.last_inv is not None:
        head["last_inv"] = header.last_inv
    return [topic, _dumps(head), _dumps(body)]


def decode(frames: Sequence[bytes]) -> Message | None:
    """The message, or None when it is not one this node can read (counted by the caller)."""
    if len(frames) < 3:
        return None
    try:
        head = json.loads(frames[1])
        body = json.loads(frames[2])
        if not isinstance(head, dict) or not isinstance(body, dict) or head.get("v") != VERSION:
            return None
        lsn = head.get("lsn")
        traceparent = head.get("traceparent")
        last_inv = head.get("last_inv")
        header = Header(
            node=str(head["node"]),
            epoch=int(head["epoch"]),
            seq=int(head["seq"]),
            lsn=None if lsn is None else int(lsn),
            sent=float(head.get("sent", 0.0)),
            traceparent=traceparent if isinstance(traceparent, str) else None,
            last_inv=last_inv if isinstance(last_inv, int) and last_inv >= 0 else None,
        )
    except (ValueError, KeyError, TypeError):
        return None
    return Message(bytes(frames[0]), header, body)


def invalidation_body(batches: Sequence[tuple[Sequence[str], int | None, float]]) -> dict[str, Any]:
    """`inv`: one entry per publish call of the tick: its keys, its commit LSN,
    and when it was published (wall clock), for the commit-to-applied latency."""
    return {"batches": [{"keys": list(k), "lsn": lsn, "at": at} for k, lsn, at in batches]}


def invalidation_batches(body: Mapping[str, Any]) -> list[tuple[list[str], int | None, float]]:
    """The batches of an `inv` body; malformed entries are skipped."""
    out: list[tuple[list[str], int | None, float]] = []
    batches = body.get("batches")
    if not isinstance(batches, list):
        return out
    for batch in batches:
        if not isinstance(batch, dict):
            continue
        keys, lsn, at = batch.get("keys"), batch.get("lsn"), batch.get("at")
        if not isinstance(keys, list) or not (lsn is None or isinstance(lsn, int)):
            continue
        at_s = float(at) if isinstance(at, int | float) else time.time()
        out.append(([str(k) for k in keys], lsn, at_s))
    return out


def _dumps(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
