"""Drain: who asked the node to leave rotation, and the drain file watcher.

Three sources can drain a node: a stop signal (SIGTERM/SIGINT, handled in
service/server.py), the drain file (operators and BGP tooling speak files) and
the admin endpoint. The node stays DRAINING while any source still holds it;
undrain releases one source, and the node serves again only when none is
left and the process is not stopping. A stop is final: once a signal has
arrived nothing undrains.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from service.health.lifecycle import Lifecycle, State
from service.tasks import cancel_within

log = logging.getLogger("service.health.drain")

# One os.stat per poll; half of the bound the drain-file test holds the flip
# to (tests/system/test_drain.py, FLIP_BOUND_S).
DRAIN_FILE_POLL_S = 0.05

# Drain sources besides these two are signal names (SIGTERM): NodeServer's.
FILE = "file"
ADMIN = "admin"


class CannotUndrain(Exception):
    """Undrain refused: the process is stopping, or another source still drains it."""


class DrainController:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.sources: set[str] = set()
        self.stop_requested = False
        self.drain_file: Path | None = None
        # Where an undrained node goes; the health runtime points this at the
        # checks (READY or DEGRADED) once they run.
        self.serving_state: Callable[[], State] = lambda: State.ready

    @property
    def draining(self) -> bool:
        return self.lifecycle.state is State.draining

    def drain(self, source: str) -> None:
        """Leave rotation now: readiness and the agent flip on the next probe."""
        self.sources.add(source)
        if self.lifecycle.state in (State.starting, State.ready, State.degraded):
            self.lifecycle.move(State.draining)
            log.warning("draining (asked by %s)", source)

    def request_stop(self, source: str) -> None:
        """A stop signal: drain, and never come back."""
        self.stop_requested = True
        self.drain(source)

    def undrain(self, source: str) -> State:
        """Release `source`'s hold; raises CannotUndrain saying why the node stays out."""
        if self.stop_requested or self.lifecycle.state in (State.stopping, State.stopped):
            raise CannotUndrain("the process is stopping; a stopping node never undrains")
        self.sources.discard(source)
        if self.sources:
            raise CannotUndrain(self._still_held())
        if self.lifecycle.state is State.draining:
            target = self.serving_state()
            self.lifecycle.move(target)
            log.warning("undrained (released by %s): %s", source, target)
        return self.lifecycle.state

    def _still_held(self) -> str:
        held = []
        if FILE in self.sources:
            held.append(f"the drain file {self.drain_file} exists; remove it to undrain")
        held.extend(f"drained by {s}" for s in sorted(self.sources - {FILE}))
        return "; ".join(held)


class DrainFileWatcher:
    """Drains while CATTLE_DRAIN_FILE exists; undrains when it goes (unless stopping)."""

    def __init__(self, path: Path, controller: DrainController) -> None:
        self.path = path
        self.controller = controller
        controller.drain_file = path
        self._seen = False
        self._task: asyncio.Task[None] | None = None

    def poll(self) -> None:
        """One look at the file; acts only when its presence changed."""
        try:
            os.stat(self.path)
            exists = True
        except FileNotFoundError:
            exists = False
        except OSError as exc:  # e.g. a directory we may not enter: keep the last verdict
            log.debug("cannot stat drain file %s: %s", self.path, exc)
            return
        if exists == self._seen:
            return
        self._seen = exists
        if exists:
            log.warning("drain file %s appeared", self.path)
            self.controller.drain(FILE)
        else:
            log.warning("drain file %s removed", self.path)
            try:
                self.controller.undrain(FILE)
            except CannotUndrain as exc:
                log.info("staying drained: %s", exc)

    def start(self) -> None:
        self.poll()  # a node started with the file present never reports READY
        self._task = asyncio.create_task(self._run(), name="drain-file-watcher")

    async def stop(self, timeout_s: float) -> None:
        await cancel_within(self._task, timeout_s)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_FILE_POLL_S)
            try:
                self.poll()
            except Exception:  # a watcher that dies silently would pin the node's state
                log.exception("drain file poll failed")
