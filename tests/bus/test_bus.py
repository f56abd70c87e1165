"""Buses on loopback in this process: what one publishes the others apply, once,
in order, with losses detected; discovery by DNS; trace context carried."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
from collections.abc import Iterable

import pytest
import zmq
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.bus import Bus, BusRefused, PeerState, membership, messages
from service.bus.messages import Header
from tests.bus.conftest import Sink, StartBus, bus_settings, until


async def pair(start_bus: StartBus) -> tuple[Bus, Bus, Sink]:
    """A publishes, B subscribes to A (and has heard A at least once)."""
    a = await start_bus("a")
    b = await start_bus("b", bus_peers=[a.endpoint])
    sink = Sink()
    b.subscribe_invalidations(sink)
    assert await until(lambda: "a" in b.membership.peers, 5.0) is not None
    return a, b, sink


async def test_invalidations_reach_the_peer_with_their_lsn(start_bus: StartBus) -> None:
    a, b, sink = await pair(start_bus)
    a.publish_invalidations(["note:1", "note:2"], 41)
    assert await until(lambda: len(sink.invalidated) == 1, 2.0) is not None
    assert sink.invalidated == [(["note:1", "note:2"], 41)]
    assert b.lsn == 41  # the newest LSN B knows of follows what it applied
    assert b.snapshot()["peers"]["a"]["state"] == "alive"


async def test_the_keys_of_one_loop_tick_travel_in_one_message(start_bus: StartBus) -> None:
    a, _b, sink = await pair(start_bus)
    sent_before = a.counts["sent"]
    for i in range(50):
        a.publish_invalidations([f"note:{i}"], 100 + i)
    # All fifty calls happened in one tick: not one message has gone yet.
    assert a.counts["sent"] == sent_before
    assert await until(lambda: len(sink.keys) == 50, 2.0) is not None
    inv_messages = a.counts["sent"] - sent_before
    assert inv_messages <= 2, inv_messages  # one inv (and perhaps a heartbeat)
    assert sink.invalidated[0] == (["note:0"], 100) and sink.invalidated[-1] == (["note:49"], 149)


async def test_a_message_with_fields_this_node_does_not_know_is_applied(
    start_bus: StartBus,
) -> None:
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        b = await start_bus("b", bus_peers=[f"tcp://127.0.0.1:{port}"])
        sink = Sink()
        b.subscribe_invalidations(sink)
        head = {"v": 1, "node": "x", "epoch": 3, "seq": 1, "lsn": 7, "sent": 0, "shard": "eu"}
        body = {"batches": [{"keys": ["k"], "lsn": 7, "at": 0, "why": "test"}], "more": [1]}
        frames = [messages.INV, json.dumps(head).encode(), json.dumps(body).encode()]

        def sent_and_applied() -> bool:
            pub.send_multipart(frames)  # slow joiner: resend until B hears one
            return bool(sink.invalidated)

        assert await until(sent_and_applied, 5.0) is not None
        assert sink.invalidated[0] == (["k"], 7)
    finally:
        pub.close()
        context.term()


async def test_a_lost_message_is_a_gap_and_the_sink_drops_older_entries(
    start_bus: StartBus,
) -> None:
    a, b, sink = await pair(start_bus)
    sink.older_than.clear()  # B joined late: that one is not this test's
    a.publish_invalidations(["note:1"], 10)
    assert await until(lambda: sink.invalidated, 2.0) is not None
    a._seq += 1  # one invalidation lost on the way (the receiver sees the jump)
    a._last_inv = a._seq
    a.publish_invalidations(["note:2"], 12)
    assert await until(lambda: len(sink.invalidated) == 2, 2.0) is not None
    assert sink.older_than == [12], "the gap was not reported"
    assert b.losses[membership.Loss.gap] == 1


async def test_a_gap_of_heartbeats_only_drops_nothing(start_bus: StartBus) -> None:
    """The next message says where the sender's last invalidation was: before the gap."""
    a, b, sink = await pair(start_bus)
    sink.older_than.clear()
    a.publish_invalidations(["note:1"], 10)
    assert await until(lambda: sink.invalidated, 2.0) is not None
    a._seq += 3  # three heartbeats lost
    a.publish_invalidations(["note:2"], 12)
    assert await until(lambda: len(sink.invalidated) == 2, 2.0) is not None
    assert b.losses[membership.Loss.gap] == 1  # seen and counted,
    assert sink.older_than == []  # but nothing cached was dropped


async def test_a_sender_that_does_not_say_where_its_last_invalidation_was_drops_on_a_gap(
    start_bus: StartBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same heartbeat-only gap from a sender without `last_inv`
    (an older version) must be taken as a possible lost invalidation."""
    a, _b, sink = await pair(start_bus)
    sink.older_than.clear()
    encode = messages.encode

    def without_last_inv(topic: bytes, header: Header, body: dict) -> list[bytes]:
        return encode(topic, dataclasses.replace(header, last_inv=None), body)

    monkeypatch.setattr(messages, "encode", without_last_inv)
    a.publish_invalidations(["note:1"], 10)
    assert await until(lambda: sink.invalidated, 2.0) is not None
    a._seq += 3
    a.publish_invalidations(["note:2"], 12)
    assert await until(lambda: len(sink.invalidated) == 2, 2.0) is not None
    assert sink.older_than == [12]


async def test_without_gap_handling_the_loss_goes_unnoticed(
    start_bus: StartBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "DETECT_LOSS", False)
    a, _b, sink = await pair(start_bus)
    a.publish_invalidations(["note:1"], 10)
    assert await until(lambda: sink.invalidated, 2.0) is not None
    a._seq += 1
    a.publish_invalidations(["note:2"], 12)
    assert await until(lambda: len(sink.invalidated) == 2, 2.0) is not None
    assert sink.older_than == []


async def test_a_late_joiner_drops_what_it_may_have_missed(start_bus: StartBus) -> None:
    a = await start_bus("a")
    for i in range(3):
        a.publish_invalidations([f"note:{i}"], 20 + i)
        await asyncio.sleep(0.01)
    b = await start_bus("b", bus_peers=[a.endpoint])
    sink = Sink()
    b.subscribe_invalidations(sink)
    assert await until(lambda: sink.older_than, 3.0) is not None
    assert sink.older_than[0] == 22  # A's newest LSN when B first heard it
    assert b.losses[membership.Loss.late_join] == 1


async def _restart(
    start_bus: StartBus, *, goodbye: bool, invalidate_before_heard: bool
) -> tuple[Bus, Sink]:
    """A restarts on its port (a new epoch), after a goodbye or killed without
    one; B's sink, with what B dropped since the restart."""
    a = await start_bus("a")
    endpoint = a.endpoint
    assert endpoint is not None
    b = await start_bus("b", bus_peers=[endpoint])
    sink = Sink()
    b.subscribe_invalidations(sink)
    assert await until(lambda: "a" in b.membership.peers, 5.0) is not None
    first_epoch = a.epoch
    if goodbye:
        await a.close(2.0)
        assert await until(lambda: b.membership.peers["a"].state is PeerState.left, 3.0) is not None
    else:
        # Killed: the socket goes without a goodbye.
        assert a._pub is not None
        a._pub.close(linger=0)
        a._pub = None
        await a.close(2.0)
    sink.older_than.clear()
    restarted = await start_bus("a", bus_bind=endpoint)  # same node, same port, new process
    assert restarted.epoch != first_epoch
    restarted.observe_lsn(30)
    if invalidate_before_heard:
        # An invalidation B never gets (as one published before B's connection is up).
        restarted._seq += 1
        restarted._last_inv = restarted._seq
    assert await until(lambda: b.membership.peers["a"].epoch == restarted.epoch, 5.0) is not None
    assert b.losses[membership.Loss.new_epoch] == 1
    assert b.membership.peers["a"].state is PeerState.alive  # back from LEFT
    return b, sink


async def test_a_peer_restarted_after_its_goodbye_drops_nothing_it_did_not_write(
    start_bus: StartBus,
) -> None:
    """A rolling restart: the old epoch ended with a goodbye, and the new one
    published no invalidation before B heard it, so B's cache stays."""
    _b, sink = await _restart(start_bus, goodbye=True, invalidate_before_heard=False)
    assert sink.older_than == []


async def test_a_peer_killed_and_restarted_drops_what_its_last_messages_may_have_said(
    start_bus: StartBus,
) -> None:
    """The control: no goodbye, so the old epoch's last messages may be lost."""
    _b, sink = await _restart(start_bus, goodbye=False, invalidate_before_heard=False)
    assert sink.older_than == [30]


async def test_a_restarted_peer_whose_first_invalidation_was_missed_drops(
    start_bus: StartBus,
) -> None:
    _b, sink = await _restart(start_bus, goodbye=True, invalidate_before_heard=True)
    assert sink.older_than == [30]


async def test_dns_peers_are_resolved_and_connected_once_per_address(
    start_bus: StartBus,
) -> None:
    a = await start_bus("a")
    assert a.endpoint is not None
    port = int(a.endpoint.rsplit(":", 1)[1])
    b = await start_bus("b", bus_peers=[f"dns://localhost:{port}"])
    assert f"tcp://127.0.0.1:{port}" in b.links  # resolved by the node, not by libzmq
    assert "tcp://localhost" not in " ".join(b.links)
    assert await until(lambda: "a" in b.membership.peers, 5.0) is not None


async def test_dns_changes_are_followed_and_a_departed_peer_is_kept_while_it_speaks(
    start_bus: StartBus,
) -> None:
    a = await start_bus("a")
    c = await start_bus("c")
    port_a = int(str(a.endpoint).rsplit(":", 1)[1])
    port_c = int(str(c.endpoint).rsplit(":", 1)[1])
    # A stub DNS server for the name "fleet": what it answers is what the test sets.
    answers: dict[int, list[str]] = {port_a: ["127.0.0.1"], port_c: []}

    async def resolver(host: str, port: int) -> Iterable[str]:
        assert host == "fleet"
        return answers[port]

    b = await start_bus(
        "b", resolver=resolver, bus_peers=[f"dns://fleet:{port_a}", f"dns://fleet:{port_c}"]
    )
    assert await until(lambda: "a" in b.membership.peers, 5.0) is not None
    answers[port_c] = ["127.0.0.1"]  # c appears in DNS
    assert await until(lambda: "c" in b.membership.peers, 3.0) is not None
    answers[port_a] = []  # a leaves DNS (a draining pod) but keeps publishing
    await asyncio.sleep(5 * b.settings.bus_dns_interval_s)
    assert f"tcp://127.0.0.1:{port_a}" in b.links, "dropped a peer that still speaks"
    sink = Sink()
    b.subscribe_invalidations(sink)
    a.publish_invalidations(["late"], 50)
    assert await until(lambda: sink.keys == ["late"], 2.0) is not None
    await a.close(2.0)  # bye: now it may go
    assert await until(lambda: f"tcp://127.0.0.1:{port_a}" not in b.links, 3.0) is not None
    assert f"tcp://127.0.0.1:{port_c}" in b.links


async def test_applying_an_invalidation_is_a_span_linked_to_the_writers_span(
    start_bus: StartBus,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    a = await start_bus("a")
    b = Bus(bus_settings("b", bus_peers=[a.endpoint]), tracer_provider=provider)
    await b.start()
    try:
        sink = Sink()
        b.subscribe_invalidations(sink)
        assert await until(lambda: "a" in b.membership.peers, 5.0) is not None
        writer = provider.get_tracer("test")
        with writer.start_as_current_span("PATCH /v1/notes/{id}") as span:
            a.publish_invalidations(["note:1"], 5)
            writer_context = span.get_span_context()
        assert await until(lambda: sink.invalidated, 2.0) is not None
        applied = [s for s in exporter.get_finished_spans() if s.name == "bus inv apply"]
        assert len(applied) == 1
        (link,) = applied[0].links
        assert link.context.trace_id == writer_context.trace_id
        assert link.context.span_id == writer_context.span_id
    finally:
        await b.close(2.0)


async def test_heartbeats_carry_state_and_cache_stats_and_go_out_at_once_on_request(
    start_bus: StartBus,
) -> None:
    a, b, _ = await pair(start_bus)
    a.set_stats_provider(lambda: {"entries": 3, "hits": 10, "misses": 2})
    a.announce()
    assert await until(lambda: "cache" in b.membership.peers["a"].status, 1.0) is not None
    status = b.membership.peers["a"].status
    assert status["cache"] == {"entries": 3, "hits": 10, "misses": 2}
    assert status["state"] == "ready" and status["endpoint"] == a.endpoint


async def test_a_subscriber_that_joins_hears_a_heartbeat_at_once(start_bus: StartBus) -> None:
    # Heartbeats every 30 s: A's first one went out before B connected. B hears A
    # within a second only because A greets every new subscriber (a plain PUB
    # would leave B waiting the whole interval: the control, on the old code).
    slow = {"bus_heartbeat_interval_s": 30, "bus_suspect_after_s": 60, "bus_dead_after_s": 90}
    a = await start_bus("a", **slow)
    b = await start_bus("b", bus_peers=[a.endpoint], **slow)
    heard = await until(lambda: "a" in b.membership.peers, 1.0)
    assert heard is not None, "B heard nothing from A within 1 s of subscribing"
    assert b.membership.peers["a"].state is PeerState.alive


async def test_a_bus_in_a_multiprocessing_child_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    bus = Bus(bus_settings("worker"))
    with pytest.raises(BusRefused, match="one process per node"):
        await bus.start()


async def test_a_taken_port_is_refused_with_what_to_do(start_bus: StartBus) -> None:
    a = await start_bus("a")
    bus = Bus(bus_settings("b", bus_bind=a.endpoint))
    with pytest.raises(BusRefused, match="another process holds that port"):
        await bus.start()


def test_a_header_is_small() -> None:
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    frames = messages.encode(messages.INV, Header("node-1", 2**62, 10**9, 2**40, 1.7e9, tp), {})
    assert len(frames[1]) < 200


async def test_metrics_count_messages_losses_peers_and_invalidation_latency(
    start_bus: StartBus,
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    a = await start_bus("a")
    b = Bus(bus_settings("b", bus_peers=[a.endpoint]), meter=meter)
    await b.start()
    try:
        sink = Sink()
        b.subscribe_invalidations(sink)
        assert await until(lambda: "a" in b.membership.peers, 5.0) is not None
        a._seq += 1  # one lost
        a.publish_invalidations(["note:1"], 5)
        assert await until(lambda: sink.invalidated, 2.0) is not None
        data = reader.get_metrics_data()
        assert data is not None
        points = {
            metric.name: list(metric.data.data_points)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }
        received = {
            p.attributes["topic"]: p.value
            for p in points["cattle.bus.messages"]
            if p.attributes["direction"] == "received"
        }
        assert received["inv"] == 1 and received["hb"] >= 1
        kinds = {p.attributes["kind"]: p.value for p in points["cattle.bus.losses"]}
        assert kinds["gap"] == 1
        alive = [p.value for p in points["cattle.bus.peers"] if p.attributes["state"] == "alive"]
        assert alive == [1]
        (latency,) = points["cattle.bus.invalidation.latency"]
        assert latency.count == 1 and 0 <= latency.sum < 1.0
    finally:
        await b.close(2.0)
