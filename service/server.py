"""Run one node: uvicorn with uvloop and httptools, one process, the drain sequence
and the limits of a connection (GuardedHttpToolsProtocol, below).

uvicorn on its own closes the listener the moment SIGTERM arrives, which
turns every request a proxy has not yet rerouted into a connection error.
NodeServer puts the drain in front of that:

    SIGTERM   lifecycle -> DRAINING: /readyz 503 and agent `drain` at once,
              responses carry `Connection: close`, requests are still served
    +drain_delay_s       should_exit: the listener closes (lifecycle STOPPING),
                         the agent port closes, idle connections are closed
    +shutdown_timeout_s  in-flight requests had this long to finish (uvicorn's
                         timeout_graceful_shutdown); the rest are cancelled
    +close_timeout_s     pools and telemetry closed, lifecycle STOPPED, exit 0

A second SIGTERM or SIGINT exits at once. A watchdog thread exits (status 1)
if the whole shutdown overruns its bounds, so an orchestrator's SIGKILL is
never what ends a node.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar, cast

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from service import NAME, node
from service.config import Settings, env_var
from service.health.drain import DrainController
from service.health.lifecycle import Lifecycle, State
from service.problems import PROBLEM_JSON, problem_body, problem_type
from service.telemetry.logs import log_config

log = logging.getLogger("service.server")

# Past shutdown_timeout_s + close_timeout_s, this much more before the watchdog
# gives up on a clean exit.
_WATCHDOG_MARGIN_S = 1.0
# A client that connected just before the listener closed has sent its
# request well within this (loopback or LAN); see NodeServer.shutdown.
_LATE_REQUEST_GRACE_S = 0.1
# uvicorn.Server.shutdown sleeps this long before its graceful timeout starts.
_UVICORN_SHUTDOWN_PAUSE_S = 0.1


def graceful_timeout_s(settings: Settings) -> float:
    """uvicorn's timeout_graceful_shutdown, so that CATTLE_SHUTDOWN_TIMEOUT_S
    counts from the moment the listener closes, fixed pauses included."""
    return max(0.1, settings.shutdown_timeout_s - _LATE_REQUEST_GRACE_S - _UVICORN_SHUTDOWN_PAUSE_S)


class NodeServer(uvicorn.Server):
    """uvicorn.Server whose first stop signal drains before it stops."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        settings: Settings,
        lifecycle: Lifecycle,
        drain: DrainController,
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain = drain
        self.drain_delay_s = settings.drain_delay_s
        self.watchdog_s = (
            settings.shutdown_timeout_s + settings.close_timeout_s + _WATCHDOG_MARGIN_S
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_signal: int | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            freeze_startup_objects()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A Python signal handler runs between two bytecodes of whatever the
        # loop was doing, so it only hands the work to the loop. It never
        # records the signal for uvicorn, which would re-raise it after a
        # clean shutdown and turn exit 0 into death by SIGTERM.
        if self._stop_signal is not None:
            _exit_now(sig)
        self._stop_signal = sig
        if self._loop is None:
            self.should_exit = True
            return
        # An empty context: the handler interrupted some request, whose trace
        # context must not be inherited by the drain.
        self._loop.call_soon_threadsafe(self._start_drain, sig, context=contextvars.Context())

    def _start_drain(self, sig: int) -> None:
        self._drain_task = asyncio.create_task(self._drain_then_stop(sig), name="drain")

    async def _drain_then_stop(self, sig: int) -> None:
        name = signal.Signals(sig).name
        before = self.lifecycle.state
        self.drain.request_stop(name)
        if before is State.starting:
            delay_s = 0.0  # nobody has been sent here yet: nothing to wait for
        elif before is State.draining:
            # Already out of rotation (drain file, admin): count that time.
            delay_s = max(0.0, self.drain_delay_s - (time.monotonic() - self.lifecycle.changed_at))
        else:
            delay_s = self.drain_delay_s
        log.warning(
            "%s: draining; serving %.1f s more, then closing the listener (%s again exits at once)",
            name, delay_s, name,
        )  # fmt: skip
        if delay_s:
            await asyncio.sleep(delay_s)
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.lifecycle.move(State.stopping)
        watchdog = threading.Timer(self.watchdog_s, _overran, args=(self.watchdog_s,))
        watchdog.daemon = True
        watchdog.start()
        # Stop accepting first, then give connections accepted in the last
        # moments time to deliver their request: uvicorn's shutdown closes a
        # connection that has not sent one yet as idle, which would fail a
        # request the client had already sent.
        for server in getattr(self, "servers", []):
            server.close()
        await asyncio.sleep(_LATE_REQUEST_GRACE_S)
        await super().shutdown(sockets)


def freeze_startup_objects() -> None:
    """Move everything start-up made out of the garbage collector's sight.

    Modules, the app, its routes and schemas, the ORM's metadata: over a
    hundred thousand objects that live as long as the process, which every
    full collection would otherwise walk again. Collected first, so only live
    objects are frozen.
    """
    gc.collect()
    gc.freeze()
    log.info("froze %d start-up objects out of the garbage collector's way", gc.get_freeze_count())


def _exit_now(sig: int) -> None:
    os.write(2, f"{NAME}: second {signal.Signals(sig).name}, exiting now\n".encode())
    os._exit(128 + sig)


def _overran(after_s: float) -> None:
    os.write(2, f"{NAME}: shutdown still running after {after_s:.1f} s, exiting\n".encode())
    os._exit(1)


# -- the connection: limits uvicorn's httptools protocol does not have ---------


@dataclass(frozen=True)
class ConnectionLimits:
    """What one HTTP connection may cost the node (CATTLE_* settings, see config.py)."""

    node_id: str
    max_header_bytes: int
    max_header_count: int
    header_timeout_s: float
    body_timeout_s: float
    linger_timeout_s: float
    linger_max_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            node_id=settings.node_id,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            linger_timeout_s=settings.linger_timeout_s,
            linger_max_bytes=settings.linger_max_bytes,
        )


class _Refused(Exception):
    """Raised in a parser callback: httptools stops parsing and uvicorn calls
    send_400_response, which answers with the refusal instead."""


class _StagedCloseTransport:
    """The transport uvicorn's protocol and its request cycles write to, whose
    close() is the protocol's staged close. Everything else is the real one."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close_staged()

    def is_closing(self) -> bool:
        return self._protocol.closing or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeadWithBody:
    """The transport one request's cycle writes to: the response's head is
    held until the body's first write and leaves with it, in one write.
    Everything else is the connection's transport.

    uvicorn writes the head when the application starts its response and the
    body when it sends it, and the application's own work runs in between
    (telemetry, the edge's headers). A node killed in that gap leaves its
    proxy a 200 without a body: too late to retry, so the client gets a
    response cut short. With one write, a kill lands either before the
    response (nothing was sent; the proxy retries) or after it.
    """

    __slots__ = ("_cycle", "_head", "_head_seen", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head = b""
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        elif not self._head_seen and self._cycle.response_started:
            # The first write once the response has started is its head (an
            # interim "100 Continue" is written before, and goes at once). No
            # body write follows a HEAD's head: that one goes at once too.
            self._head_seen = True
            if self._cycle.scope["method"] != "HEAD":
                self._head = data
                return
        self._transport.write(data)

    def close(self) -> None:
        if self._head:  # the application failed after its head: send what was started
            head, self._head = self._head, b""
            self._transport.write(head)
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits a node exposed to clients
    directly needs (behind HAProxy, HAProxy enforces the same ones first).

    uvicorn with httptools bounds neither a request's head (httptools keeps
    appending to a header until it ends) nor the time a client takes to send
    it, and closes at once after answering a request whose body it has not
    read, so a client still sending sees a reset instead of the answer. This
    subclass adds, per connection:

    - head limits: a request line and headers over max_header_bytes, or more
      than max_header_count headers, get a 431 problem. A head still
      incomplete after several reads is counted by the bytes read, so one
      endless header costs at most the limit plus two reads (the first read
      of a request is not counted: it may end a previous, pipelined one);
    - deadlines: the head must be complete header_timeout_s after the
      connection opened or the request's first bytes arrived, the body
      body_timeout_s after the head. Past either, a 408 problem (or, for a
      connection that never sent a byte, a silent close; if the response has
      already started, just the close);
    - a staged close (RFC 9112 section 9.6) whenever the node closes before
      it has read the whole request (a 413, 431 or 408, a drain): the answer
      is sent and the write side shut, then whatever the client still sends
      is read and dropped, up to linger_max_bytes or linger_timeout_s, so the
      client reads the answer instead of a reset.

    Timers are armed only while a request is incomplete after a read, so a
    request that arrives in one read costs none.
    """

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closing = False
        self._raw: asyncio.Transport | None = None
        self._in_head = False  # the request has begun, its headers are incomplete
        self._in_body = False  # the headers are complete, the body is not
        self._head_bytes = 0  # request target + header names and values parsed
        self._head_bytes_read = 0  # bytes read while the head stayed incomplete
        self._refusal: tuple[int, str, str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_for = ""
        self._linger_left = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw = transport
        self.transport = cast(asyncio.Transport, _StagedCloseTransport(transport, self))
        # A client that connects and sends nothing is bound by the head's deadline too.
        self._arm("head", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.closing:  # lingering: read and drop, within the bounds
            self._linger_left -= len(data)
            if self._linger_left < 0 and self._raw is not None:
                self._raw.close()
            return
        head_was_open = self._in_head
        super().data_received(data)
        if self.closing:
            return
        if self._in_head:
            if head_was_open:  # the whole read belongs to this head
                self._head_bytes_read += len(data)
                if self._head_bytes_read > self.limits.max_header_bytes:
                    self._answer(*self._head_too_large(self._head_bytes_read))
                    return
            if self._timer is None:
                self._arm("head", self.limits.header_timeout_s)
        elif self._in_body and self._timer_for != "body":
            self._arm("body", self.limits.body_timeout_s)

    # Parser callbacks (httptools calls them during feed_data).

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._head_bytes_read = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        if len(self.headers) >= self.limits.max_header_count:
            self._refusal = (
                431,
                "request-header-fields-too-large",
                f"the request has more than {self.limits.max_header_count} header fields "
                f"({env_var('max_header_count')})",
            )
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body = False, True
        self._cancel_timer()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a request for the application (not an upgrade)
            held = _HeadWithBody(self.transport, self.cycle)
            self.cycle.transport = cast(asyncio.Transport, held)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._cancel_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._answer(*self._refusal)
        else:
            super().send_400_response(msg)

    # The limits.

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.limits.max_header_bytes:
            self._refusal = self._head_too_large(self._head_bytes)
            raise _Refused

    def _head_too_large(self, size: int) -> tuple[int, str, str]:
        return (
            431,
            "request-header-fields-too-large",
            f"the request line and headers exceed {self.limits.max_header_bytes} bytes "
            f"(at least {size} received; {env_var('max_header_bytes')})",
        )

    def _arm(self, phase: str, delay_s: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay_s, self._timed_out, phase)
        self._timer_for = phase

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_for = ""

    def _timed_out(self, phase: str) -> None:
        self._timer = None
        if self.closing:
            return
        if phase == "head":
            if not self._in_head:  # nothing asked, so nothing to answer
                self.transport.close()
                return
            self._answer(
                408,
                "request-timeout",
                f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s "
                f"({env_var('header_timeout_s')})",
            )
            return
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            self.transport.close()  # answered already; stop reading the rest
            return
        # The application is waiting for the rest of the body: it will see the
        # client gone (http.disconnect) and whatever it sends is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        self._answer(
            408,
            "request-timeout",
            f"the request body did not arrive within {self.limits.body_timeout_s:g} s of its "
            f"headers ({env_var('body_timeout_s')}); was its Content-Length larger than the body?",
        )

    def _answer(self, status: int, slug: str, detail: str) -> None:
        """Answer with a problem document the node writes itself (no request
        reached the application), then close in stages."""
        assert self._raw is not None
        log.info("%s:%d: %d %s", *(self.client or ("?", 0)), status, detail)
        body = json.dumps(problem_body(status, detail, type_=problem_type(slug))).encode()
        headers = [
            *self.server_state.default_headers,
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-served-by", self.limits.node_id.encode()),
            (b"connection", b"close"),
        ]
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self._raw.write(STATUS_LINE[status] + head + b"\r\n" + body)
        self.transport.close()

    def close_staged(self) -> None:
        """Close; if the request is not read to its end yet, close in stages."""
        raw = self._raw
        if self.closing or raw is None:
            return
        self.closing = True
        self._cancel_timer()
        if not (self._in_head or self._in_body) or not raw.can_write_eof():
            raw.close()
            return
        raw.write_eof()  # sent once the answer before it is
        self._linger_left = self.limits.linger_max_bytes
        self._timer = self.loop.call_later(self.limits.linger_timeout_s, raw.close)
        self.flow.resume_reading()  # the rest must be read to be dropped


def protocol_class(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """GuardedHttpToolsProtocol bound to this node's limits: uvicorn builds
    one per connection from a class, so the limits travel as a class attribute."""
    return type(
        "NodeHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"limits": ConnectionLimits.from_settings(settings)},
    )


def serve(app: FastAPI, settings: Settings) -> None:
    """Serve `app` (built by the caller: this module knows no domain) until stopped."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(settings),
        # No route is a WebSocket: an upgrade request is served as plain HTTP,
        # and no connection outlives the limits of GuardedHttpToolsProtocol.
        ws="none",
        lifespan="on",
        server_header=False,
        # JSON lines on stdout for uvicorn's loggers too. The access log is
        # the node's own (service.telemetry.http, CATTLE_ACCESS_LOG), not uvicorn's.
        log_config=log_config(settings),
        log_level=settings.log_level,
        access_log=False,
        # uvicorn annotates int; asyncio.wait_for takes any number of seconds.
        timeout_graceful_shutdown=cast(int, graceful_timeout_s(settings)),
    )
    NodeServer(
        config, settings=settings, lifecycle=node.lifecycle(app), drain=node.drain(app)
    ).run()
