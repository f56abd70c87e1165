"""The node's lifecycle state machine.

STARTING -> READY <-> DEGRADED -> DRAINING -> STOPPING -> STOPPED. DRAINING may
go back to READY (undrain) only while the process is not stopping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger("service.lifecycle")


class State(StrEnum):
    starting = "starting"
    ready = "ready"
    degraded = "degraded"
    draining = "draining"
    stopping = "stopping"
    stopped = "stopped"


# Which moves are legal; anything else is a bug in the caller.
_ALLOWED: dict[State, frozenset[State]] = {
    State.starting: frozenset({State.ready, State.degraded, State.draining, State.stopping}),
    State.ready: frozenset({State.degraded, State.draining, State.stopping}),
    State.degraded: frozenset({State.ready, State.draining, State.stopping}),
    State.draining: frozenset({State.ready, State.degraded, State.stopping}),
    State.stopping: frozenset({State.stopped}),
    State.stopped: frozenset(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.state = State.starting
        self.changed_at = time.monotonic()
        self._listeners: list[Callable[[State, State], None]] = []

    def subscribe(self, listener: Callable[[State, State], None]) -> None:
        """Call `listener(old, new)` on every change, synchronously."""
        self._listeners.append(listener)

    def move(self, new: State) -> bool:
        """Change state if the move is allowed; False (and no change) otherwise."""
        old = self.state
        if new == old:
            return True
        if new not in _ALLOWED[old]:
            return False
        self.state = new
        self.changed_at = time.monotonic()
        log.info("lifecycle %s -> %s", old, new)
        for listener in self._listeners:
            listener(old, new)
        return True

    @property
    def leaving(self) -> bool:
        return self.state in (State.draining, State.stopping, State.stopped)
