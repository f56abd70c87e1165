"""Run one node: uvicorn with uvloop and httptools, one process, and the drain sequence.

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
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import cast

import uvicorn
from fastapi import FastAPI

from service import NAME, node
from service.config import Settings
from service.health.drain import DrainController
from service.health.lifecycle import Lifecycle, State
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


def serve(app: FastAPI, settings: Settings) -> None:
    """Serve `app` (built by the caller: this module knows no domain) until stopped."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        server_header=False,
        # JSON lines on stdout for uvicorn's loggers too, its access log
        # included (switched by CATTLE_ACCESS_LOG).
        log_config=log_config(settings),
        log_level=settings.log_level,
        access_log=settings.access_log,
        # uvicorn annotates int; asyncio.wait_for takes any number of seconds.
        timeout_graceful_shutdown=cast(int, graceful_timeout_s(settings)),
    )
    NodeServer(
        config, settings=settings, lifecycle=node.lifecycle(app), drain=node.drain(app)
    ).run()
