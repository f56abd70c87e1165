"""One node's end of the bus: an XPUB socket for what it says, a SUB socket for its peers.

Built and started in the lifespan (its ZeroMQ context too: a context must
never be created at import or cross a fork), used from the event loop's
thread only, and closed within bounds. Publishing never blocks and never
waits on a peer: PUB drops a message for a subscriber whose queue is at the
high-water mark, and the receivers' sequence numbers turn that drop into a
detected loss (membership.py). Nothing a request needs waits on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import zmq
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Link, SpanKind, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from zmq.utils.monitor import parse_monitor_message

import service
from service.bus import discovery, messages
from service.bus.membership import Loss, Membership, Peer, PeerState, Verdict
from service.config import Settings, env_var
from service.tasks import cancel_within

log = logging.getLogger("service.bus")

# The membership tick runs every quarter of a heartbeat interval, at most every
# _TICK_MAX_S: the resolution of SUSPECT/DEAD and of the stall measurement.
# Every tick wakes the node's process, work or not (docs/bus.md: idle CPU).
_TICK_MAX_S = 0.25
# Messages handled per wake-up before the receiver yields to the loop.
_RECV_BATCH = 1000
_RECONNECT_IVL_MS = 100
_RECONNECT_IVL_MAX_MS = 1000
_TRACE = TraceContextTextMapPropagator()
# A link is `up` only once the ZMTP handshake succeeds. A TCP connect is not
# enough: a frozen peer's kernel still accepts one, so a link lost to a freeze
# would read `up` again a reconnect interval later. A link stays `connecting`
# until its first handshake and `down` after a loss until the next one.
_LINK_EVENTS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "up",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "down",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "down",
    zmq.EVENT_CONNECT_RETRIED: "down",
    zmq.EVENT_DISCONNECTED: "down",
    zmq.EVENT_CLOSED: "down",
}


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class InvalidationSink(Protocol):
    """What the bus tells the cache. Called on the event loop's thread; must not block."""

    def invalidate(self, keys: Sequence[str], lsn: int | None) -> None:
        """A peer wrote `keys`, committed at `lsn` (None: not known)."""

    def invalidate_older_than(self, lsn: int | None) -> None:
        """Messages of a peer may have been missed (gap, late join, restart):
        drop every entry stamped before `lsn`; None drops every entry."""


StatsProvider = Callable[[], Mapping[str, Any]]
_Handler = Callable[[Sequence[zmq.Frame]], None]


class BusRefused(RuntimeError):
    """The bus cannot start as configured; the message says what to change."""


class Bus:
    def __init__(
        self,
        settings: Settings,
        *,
        status: StatsProvider = dict,
        meter: Meter | None = None,
        tracer_provider: TracerProvider | None = None,
        resolver: discovery.Resolver = discovery.resolve_with_getaddrinfo,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.epoch = secrets.randbits(62) + 1
        self.lsn: int | None = None  # the newest commit LSN this node knows
        self.endpoint: str | None = None  # the PUB's bound endpoint, once started
        self.membership = Membership(
            own_node=settings.node_id,
            suspect_after_s=settings.bus_suspect_after_s,
            dead_after_s=settings.bus_dead_after_s,
        )
        self.links: dict[str, str] = {}  # connected endpoint -> up | connecting | down
        self.loop_lag_s = 0.0  # the worst stall of this node's loop over the last heartbeat
        self.counts: dict[str, int] = {"sent": 0, "received": 0, "unreadable": 0}
        self.losses: dict[Loss, int] = dict.fromkeys(Loss, 0)
        self._status = status
        self._stats: StatsProvider | None = None
        self._sinks: list[InvalidationSink] = []
        self._resolver = resolver
        self._specs = [discovery.parse_peer(p) for p in settings.bus_peers]
        self._static = {
            discovery.endpoint(s.host, s.port) for s in self._specs if s.scheme == "tcp"
        }
        self._resolved: dict[discovery.PeerSpec, set[str]] = {}
        self._connected: set[str] = set()
        self._source: dict[str, str] = {}  # peer node -> the endpoint its messages come from
        self._seq = 0
        self._last_inv = 0  # the seq of the newest `inv` sent (0: none yet)
        self._pending: list[tuple[list[str], int | None, float, str | None]] = []
        self._flush_scheduled = False
        self._greeting = False
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._sub: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._readers: list[tuple[zmq.Socket[bytes], _Handler]] = []
        self._fds: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("service.bus")
        self._instruments(meter)

    # -- the contract with the cache (and whoever else listens) ----------------

    def subscribe_invalidations(self, sink: InvalidationSink) -> None:
        self._sinks.append(sink)

    def set_stats_provider(self, provider: StatsProvider) -> None:
        """`provider()` is the `cache` object of every heartbeat (sizes, hits, misses)."""
        self._stats = provider

    def publish_invalidations(self, keys: Iterable[str], lsn: int | None) -> None:
        """Tell the peers `keys` changed at commit `lsn`. Never blocks: the keys
        of one loop tick go out together in one message, after the tick."""
        batch = list(keys)
        if not batch or self._pub is None or self._closed:
            return
        self.observe_lsn(lsn)
        carrier: dict[str, str] = {}
        _TRACE.inject(carrier)
        self._pending.append((batch, lsn, time.time(), carrier.get("traceparent")))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def observe_lsn(self, lsn: int | None) -> None:
        """Note a commit LSN this node knows of; headers carry the newest."""
        if lsn is not None and (self.lsn is None or lsn > self.lsn):
            self.lsn = lsn

    def announce(self) -> None:
        """Send a heartbeat now (the lifecycle changed)."""
        if self._pub is not None and not self._closed:
            self._send_heartbeat()

    # -- start and stop ----------------------------------------------------------

    async def start(self) -> None:
        if multiprocessing.parent_process() is not None:
            raise BusRefused(
                "the node bus needs one process per node, and this one was started by "
                "another Python process (uvicorn --workers or --reload, multiprocessing): "
                f"serve with `python -m {service.__name__} serve` (one process), or set "
                f"{env_var('bus')}=off"
            )
        self._context = zmq.Context()
        # The context's default too, for any socket made without it (pyzmq#837).
        self._context.linger = self._linger_ms
        try:
            self._open_pub()
            self._open_sub()
        except BaseException:
            self._context.destroy(linger=0)
            self._context = None
            raise
        log.info("bus: %s publishing on %s, epoch %d", self.node_id, self.endpoint, self.epoch)
        for spec in self._specs:
            if spec.scheme == "tcp":
                self._connect(discovery.endpoint(spec.host, spec.port))
        dns = [spec for spec in self._specs if spec.scheme == "dns"]
        if dns:
            await self._resolve_all(dns)  # connected before the first heartbeat goes out
        assert self._sub is not None
        assert self._monitor is not None
        assert self._pub is not None
        self._readers = [
            (self._sub, self._handle),
            (self._monitor, self._link_event),
            (self._pub, self._subscription),
        ]
        loop = asyncio.get_running_loop()
        for sock, _handle in self._readers:
            self._fds.append(sock.FD)
            loop.add_reader(sock.FD, self._drain_all)
        self._tasks = [
            asyncio.create_task(self._tick(), name="bus-membership"),
        ]
        if dns:
            self._tasks.append(asyncio.create_task(self._rediscover(dns), name="bus-dns"))
        self._send_heartbeat()

    @property
    def _linger_ms(self) -> int:
        # Below zero only in a test's broken variant: libzmq's "wait forever".
        return -1 if self.settings.bus_linger_s < 0 else round(self.settings.bus_linger_s * 1000)

    def _heartbeat_options(self, sock: zmq.Socket[Any]) -> None:
        # ZMTP PINGs: a peer that stops answering (SIGSTOP, a dropped route,
        # unread data ahead of the PING) has its connection closed, its queue
        # freed, and a reconnect begun, two to three suspect bounds after it
        # stopped. A PING every suspect bound, not every heartbeat: each PING
        # and PONG wakes both nodes, for every peer, and liveness comes from
        # the bus's own heartbeats. The timeouts span two PINGs: at one, a
        # PING and the peer's next one could race the timer.
        every_ms = max(100, round(self.settings.bus_suspect_after_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, every_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2 * every_ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 2 * every_ms)

    def _open_pub(self) -> None:
        assert self._context is not None
        # XPUB is PUB that also hands up the subscriptions it receives: a
        # subscriber that (re)connects gets a heartbeat at once, not up to an
        # interval later (a peer thawed from SIGSTOP is ALIVE again on the
        # first message after its connections come back). Verbose: every
        # subscriber's subscriptions, not only the first of each topic.
        pub = self._context.socket(zmq.XPUB)
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        pub.setsockopt(zmq.SNDHWM, self.settings.bus_hwm)
        pub.setsockopt(zmq.LINGER, self._linger_ms)
        self._heartbeat_options(pub)
        try:
            pub.bind(self.settings.bus_bind)
        except zmq.ZMQError as exc:
            pub.close(linger=0)
            busy = exc.errno == zmq.EADDRINUSE
            raise BusRefused(
                f"cannot bind the node bus to {self.settings.bus_bind} "
                f"({env_var('bus_bind')}): {exc}"
                + (
                    "; another process holds that port (a second node, or several "
                    "workers of one node: run one process per node)"
                    if busy
                    else "; give tcp://<address>:<port>, or port * for any free port"
                )
            ) from exc
        self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pub = pub

    def _open_sub(self) -> None:
        assert self._context is not None
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.settings.bus_hwm)
        sub.setsockopt(zmq.LINGER, 0)  # nothing a SUB holds is worth waiting for
        sub.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        self._heartbeat_options(sub)
        for topic in messages.TOPICS:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._monitor = sub.get_monitor_socket()
        self._sub = sub

    async def close(self, timeout_s: float) -> bool:
        """Say goodbye, close every socket and the context, all within `timeout_s`.

        False when the context had not terminated by then (it is left behind
        on a daemon thread: the node exits anyway).
        """
        if self._closed:
            return True
        deadline = time.monotonic() + timeout_s
        for task in self._tasks:
            await cancel_within(task, max(0.05, deadline - time.monotonic()))
        loop = asyncio.get_running_loop()
        for fd in self._fds:
            loop.remove_reader(fd)
        self._readers, self._fds = [], []
        if self._pub is not None:
            self._flush()
            self._send(messages.BYE, {"reason": "stopping"})
        self._closed = True
        context = self._context
        if context is None:
            return True
        if self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
            self._sub.close(linger=0)
        if self._monitor is not None:
            self._monitor.close(linger=0)
        if self._pub is not None:
            # A subscriber that never reads may hold messages queued for it:
            # they get bus_linger_s to leave, then they are dropped.
            self._pub.close(linger=self._linger_ms)
        # term() returns once every socket's linger is over; it runs on a
        # daemon thread so that even a libzmq that overran its linger could
        # not hold the process.
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def terminate() -> None:
            context.term()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, done)

        threading.Thread(target=terminate, name="bus-term", daemon=True).start()
        self._context = None
        try:
            await asyncio.wait_for(done, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("bus: context did not close within %.1f s; leaving it behind", timeout_s)
            return False
        return True

    # -- sending ---------------------------------------------------------------------

    def _header(self, topic: bytes, traceparent: str | None = None) -> messages.Header:
        last_inv = self._last_inv
        self._seq += 1
        if topic == messages.INV:
            self._last_inv = self._seq  # even if the send fails: a receiver must assume it
        return messages.Header(
            node=self.node_id,
            epoch=self.epoch,
            seq=self._seq,
            lsn=self.lsn,
            sent=time.time(),
            traceparent=traceparent,
            last_inv=last_inv,
        )

    def _send(self, topic: bytes, body: Mapping[str, Any], traceparent: str | None = None) -> None:
        assert self._pub is not None
        frames = messages.encode(topic, self._header(topic, traceparent), body)
        try:
            self._pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # PUB drops rather than block; anything else is logged
            log.warning("bus: sending %s failed: %s", topic.decode(), exc)
            return
        self.counts["sent"] += 1
        if self._sent_counter is not None:
            self._sent_counter.add(1, {"topic": topic.decode(), "direction": "sent"})

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if self._closed or self._pub is None:
            return
        message: list[tuple[list[str], int | None, float]] = []
        size, traceparent = 0, None
        for keys, lsn, at, parent in pending:
            for start in range(0, len(keys), messages.MAX_KEYS_PER_MESSAGE):
                part = keys[start : start + messages.MAX_KEYS_PER_MESSAGE]
                if size + len(part) > messages.MAX_KEYS_PER_MESSAGE and message:
                    self._send(messages.INV, messages.invalidation_body(message), traceparent)
                    message, size, traceparent = [], 0, None
                message.append((part, lsn, at))
                size += len(part)
                traceparent = traceparent or parent
        if message:
            self._send(messages.INV, messages.invalidation_body(message), traceparent)

    def _send_heartbeat(self) -> None:
        body: dict[str, Any] = {
            "version": service.__version__,
            "endpoint": self.endpoint,
            "loop_lag_ms": round(self.loop_lag_s * 1000, 1),
        }
        try:
            body |= dict(self._status())
            if self._stats is not None:
                body["cache"] = dict(self._stats())
        except Exception:  # a failing provider must not silence the heartbeat
            log.warning("bus: a heartbeat provider failed", exc_info=True)
        self._send(messages.HB, body)

    def _subscription(self, frames: Sequence[zmq.Frame]) -> None:
        """A subscriber (re)joined: it gets a heartbeat at once (one for all its topics)."""
        if frames[0].bytes[:1] == b"\x01" and not self._greeting:  # \x00: unsubscribe
            self._greeting = True
            asyncio.get_running_loop().call_soon(self._greet)

    def _greet(self) -> None:
        self._greeting = False
        if not self._closed:
            self._send_heartbeat()

    # -- receiving ---------------------------------------------------------------------

    # The sockets are read from one reader callback on their ZMQ_FDs, registered
    # once: no Future, poller or timeout per wake-up, and no wake-up but for a message
    # (a task awaiting the asyncio socket's poll() also woke on its timeout).
    # docs/bus.md compares the bus's CPU with the former receiver's.
    # The FD only says "look now", and a send or connect on the same socket can
    # take that signal; so every tick drains too (at most a tick late, never stuck).

    def _drain(self, sock: zmq.Socket[bytes], handle: _Handler) -> bool:
        """Handle what `sock` holds, up to _RECV_BATCH messages; True if it may hold more."""
        if self._closed or sock.closed:
            return False
        for _ in range(_RECV_BATCH):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            try:
                handle(frames)
            except Exception:  # one bad message must not stop the bus
                log.exception("bus: handling a message failed")
        return True

    def _drain_all(self) -> None:
        """Every socket, whichever FD woke the loop (an empty one costs a recv)."""
        more = False
        for sock, handle in self._readers:
            more = self._drain(sock, handle) or more
        if more:  # a full batch: the rest after the loop's other callbacks had a turn
            asyncio.get_running_loop().call_soon(self._drain_all)

    def _handle(self, frames: Sequence[zmq.Frame]) -> None:
        message = messages.decode([f.bytes for f in frames])
        if message is None:
            self.counts["unreadable"] += 1
            return
        header = message.header
        if header.node == self.node_id:
            if header.epoch == self.epoch:
                self._drop_self(frames[0])
            return
        self.counts["received"] += 1
        if self._received_counter is not None:
            topic = message.topic.decode()
            self._received_counter.add(1, {"topic": topic, "direction": "received"})
        verdict = self.membership.heard(message.topic, header, message.body)
        if not verdict.fresh:
            return
        if message.topic == messages.HB:
            self._note_source(header.node, frames[0], message.body)
        if verdict.loss is not None:
            self._lost(verdict, header)
        if message.topic == messages.INV:
            self._apply(header, message.body)

    def _lost(self, verdict: Verdict, header: messages.Header) -> None:
        assert verdict.loss is not None
        loss = verdict.loss
        self.losses[loss] += 1
        if self._loss_counter is not None:
            self._loss_counter.add(1, {"kind": str(loss), "peer": header.node})
        missed_from, last_inv = verdict.missed_from, header.last_inv
        if missed_from is not None and last_inv is not None and last_inv < missed_from:
            # Only heartbeats were missed: every cached entry stays right.
            log.info("bus: %s from %s (seq %d): no invalidation among the missed messages",
                     loss, header.node, header.seq)  # fmt: skip
            return
        log.info("bus: %s from %s (seq %d): dropping cache entries older than LSN %s",
                 loss, header.node, header.seq, header.lsn)  # fmt: skip
        for sink in self._sinks:
            try:
                sink.invalidate_older_than(header.lsn)
            except Exception:
                log.exception("bus: an invalidation sink failed")

    def _apply(self, header: messages.Header, body: Mapping[str, Any]) -> None:
        batches = messages.invalidation_batches(body)
        for _keys, lsn, _at in batches:
            self.observe_lsn(lsn)
        links = []
        if header.traceparent:
            context = _TRACE.extract({"traceparent": header.traceparent})
            span_context = trace.get_current_span(context).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        with self._tracer.start_as_current_span(
            "bus inv apply",
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "zeromq",
                "messaging.operation.type": "process",
                "messaging.destination.name": "inv",
                "cattle.bus.peer": header.node,
                "cattle.bus.seq": header.seq,
            },
        ):
            for keys, lsn, at in batches:
                for sink in self._sinks:
                    try:
                        sink.invalidate(keys, lsn)
                    except Exception:
                        log.exception("bus: an invalidation sink failed")
                if self._latency is not None:
                    self._latency.record(max(0.0, time.time() - at), {"peer": header.node})

    def _note_source(self, node: str, frame: zmq.Frame, body: Mapping[str, Any]) -> None:
        """Which of our connections a peer's messages come from: its address as
        the socket saw it, and the port it says it bound."""
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str):
            return
        port = endpoint.rsplit(":", 1)[-1]
        try:
            address = frame.get("Peer-Address")
        except zmq.ZMQError:
            return
        if isinstance(address, str) and port.isdigit():
            self._source[node] = discovery.endpoint(address, int(port))

    def _drop_self(self, frame: zmq.Frame) -> None:
        """A connection that brings our own messages (DNS named us too): disconnect it."""
        with contextlib.suppress(zmq.ZMQError):
            address = frame.get("Peer-Address")
            port = (self.endpoint or "").rsplit(":", 1)[-1]
            mine = discovery.endpoint(str(address), int(port))
            if mine in self._connected and mine not in self._static:
                log.info("bus: %s is this node; not listening to it", mine)
                self._disconnect(mine)

    # -- links and peers ---------------------------------------------------------------

    def _connect(self, endpoint: str) -> None:
        assert self._sub is not None
        if endpoint in self._connected or endpoint == self.endpoint:
            return
        self._sub.connect(endpoint)
        self._connected.add(endpoint)
        self.links[endpoint] = "connecting"
        log.info("bus: connecting to %s", endpoint)

    def _disconnect(self, endpoint: str) -> None:
        assert self._sub is not None
        if endpoint not in self._connected:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._sub.disconnect(endpoint)
        self._connected.discard(endpoint)
        self.links.pop(endpoint, None)
        log.info("bus: disconnected from %s", endpoint)

    def _link_event(self, frames: Sequence[zmq.Frame]) -> None:
        event = parse_monitor_message([f.bytes for f in frames])
        state = _LINK_EVENTS.get(zmq.Event(event["event"]))
        raw = event.get("endpoint", b"")
        endpoint = raw.decode() if isinstance(raw, bytes) else str(raw)
        if state is not None and endpoint in self._connected:
            if (self.links.get(endpoint) == "up") != (state == "up"):
                log.info("bus: link %s %s", endpoint, state)  # not every retry
            self.links[endpoint] = state

    def link_of(self, peer: Peer) -> str | None:
        source = self._source.get(peer.node)
        return None if source is None else self.links.get(source)

    async def _tick(self) -> None:
        """Membership, stalls, the safety drain, and the heartbeat when it is due:
        one timer, so the bus wakes its node no more than it must."""
        loop = asyncio.get_running_loop()
        tick_s = min(_TICK_MAX_S, self.settings.bus_heartbeat_interval_s / 4)
        beat_s = self.settings.bus_heartbeat_interval_s
        next_beat = loop.time() + beat_s * random.uniform(0.9, 1.1)
        while True:
            before = loop.time()
            await asyncio.sleep(tick_s)
            now = loop.time()
            late_s = max(0.0, now - before - tick_s)
            self.membership.stalled(late_s)
            self.loop_lag_s = max(self.loop_lag_s, late_s)
            self.membership.tick()
            self._let_go()
            self._drain_all()
            if now >= next_beat:
                # Jitter, so a fleet started together does not beat in step.
                next_beat = now + beat_s * random.uniform(0.9, 1.1)
                self._send_heartbeat()
                self.loop_lag_s = 0.0

    async def _resolve_all(self, specs: Sequence[discovery.PeerSpec]) -> None:
        timeout_s = self.settings.bus_dns_timeout_s
        found = await asyncio.gather(
            *(discovery.resolve_endpoints(s, self._resolver, timeout_s) for s in specs)
        )
        for spec, endpoints in zip(specs, found, strict=True):
            if endpoints is None:
                continue  # kept as they were
            self._resolved[spec] = endpoints
            for endpoint in sorted(endpoints):
                self._connect(endpoint)
        self._let_go()

    async def _rediscover(self, specs: Sequence[discovery.PeerSpec]) -> None:
        while True:
            await asyncio.sleep(self.settings.bus_dns_interval_s)
            await self._resolve_all(specs)

    def _let_go(self) -> None:
        """Disconnect endpoints DNS no longer names, once nobody live speaks from them:
        a draining pod leaves DNS first and may still publish invalidations."""
        named = set(self._static).union(*self._resolved.values())
        live = {
            self._source.get(p.node)
            for p in self.membership.peers.values()
            if p.state not in (PeerState.dead, PeerState.left)
        }
        for endpoint in list(self._connected):
            if endpoint not in named and endpoint not in live:
                self._disconnect(endpoint)

    # -- what /healthz and the metrics show ------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        peers = {}
        for peer in sorted(self.membership.peers.values(), key=lambda p: p.node):
            peers[peer.node] = {
                "state": str(peer.state),
                "lifecycle": peer.lifecycle,
                "link": self.link_of(peer),
                "silentS": round(self.membership.silent_s(peer), 3),
                "losses": peer.gaps,
                "endpoint": self._source.get(peer.node),
            }
        return {
            "endpoint": self.endpoint,
            "epoch": self.epoch,
            "seq": self._seq,
            "connections": dict(sorted(self.links.items())),
            "peers": peers,
        }

    def _instruments(self, meter: Meter | None) -> None:
        self._sent_counter = self._received_counter = self._loss_counter = None
        self._latency = None
        if meter is None:
            return
        prefix = f"{service.NAME}.bus"
        messages_counter = meter.create_counter(
            f"{prefix}.messages",
            unit="{message}",
            description="Bus messages sent and received, by topic.",
        )
        self._sent_counter = self._received_counter = messages_counter
        self._loss_counter = meter.create_counter(
            f"{prefix}.losses",
            unit="{event}",
            description="Detected message losses by kind (gap, late_join, new_epoch) and peer; "
            "each drops the cache entries older than the sender's LSN.",
        )
        self._latency = meter.create_histogram(
            f"{prefix}.invalidation.latency",
            unit="s",
            description="From a peer publishing an invalidation (just after its commit) "
            "to this node applying it; wall clocks of two nodes.",
            explicit_bucket_boundaries_advisory=(
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
            ),
        )  # fmt: skip

        def peers(_options: CallbackOptions) -> Iterable[Observation]:
            counts = self.membership.counts()
            return [Observation(n, {"state": str(state)}) for state, n in counts.items()]

        meter.create_observable_gauge(
            f"{prefix}.peers", callbacks=[peers], description="Bus peers by membership state."
        )
