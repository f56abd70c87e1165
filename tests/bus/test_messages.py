"""The wire format: what a node sends is what its peers read, and what they do not know they skip."""

from __future__ import annotations

import json

from service.bus import messages
from service.bus.messages import Header


def test_a_message_round_trips() -> None:
    header = Header(
        node="n1",
        epoch=7,
        seq=3,
        lsn=42,
        sent=1.5,
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    )
    body = messages.invalidation_body([(["note:1", "note:2"], 41, 1.25)])
    decoded = messages.decode(messages.encode(messages.INV, header, body))
    assert decoded is not None
    assert decoded.topic == messages.INV
    assert decoded.header == header
    assert messages.invalidation_batches(decoded.body) == [(["note:1", "note:2"], 41, 1.25)]


def test_unknown_fields_are_ignored() -> None:
    frames = messages.encode(messages.HB, Header("n1", 1, 1, None, 0.0), {"state": "ready"})
    head = json.loads(frames[1]) | {"future": {"nested": True}}
    body = json.loads(frames[2]) | {"new_gauge": 3}
    decoded = messages.decode([frames[0], json.dumps(head).encode(), json.dumps(body).encode()])
    assert decoded is not None
    assert decoded.header.node == "n1" and decoded.body["state"] == "ready"
    batches = {"batches": [{"keys": ["a"], "lsn": 5, "at": 1.0, "extra": 1}, "junk", {"keys": 3}]}
    assert messages.invalidation_batches(batches) == [(["a"], 5, 1.0)]


def test_an_unknown_major_version_or_a_malformed_message_is_dropped() -> None:
    frames = messages.encode(messages.HB, Header("n1", 1, 1, None, 0.0), {})
    head = json.loads(frames[1]) | {"v": 2}
    assert messages.decode([frames[0], json.dumps(head).encode(), frames[2]]) is None
    assert messages.decode([frames[0], b"{not json", frames[2]]) is None
    assert messages.decode([frames[0], b'{"v": 1, "node": "n1"}', frames[2]]) is None
    assert messages.decode(frames[:2]) is None
