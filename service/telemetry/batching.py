"""Per-request telemetry work done for many requests at once, after they are answered.

A candidate measured by the telemetry benchmark (CATTLE_TELEMETRY_PARTS):
the request path appends to a list; the work runs when the oldest entry is
MAX_AGE_S old, when MAX_BATCH entries wait, before /metrics is collected and
when the node stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_AGE_S = 0.05
MAX_BATCH = 256


def parts() -> frozenset[str]:
    """The candidate parts switched on while they are measured (CATTLE_TELEMETRY_PARTS)."""
    chosen = os.environ.get("CATTLE_TELEMETRY_PARTS", "")
    return frozenset(part.strip() for part in chosen.split(",") if part.strip())


class Batch:
    """Calls deferred from the event loop's thread, made in order by flush()."""

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def defer(self, work: Callable[..., object], *args: Any) -> None:
        pending = self._pending
        pending.append((work, args))
        if len(pending) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: nothing would fire the timer
                self.flush()
                return
            # An empty context: the batch belongs to no request.
            self._timer = loop.call_later(MAX_AGE_S, self.flush, context=contextvars.Context())

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        for work, args in batch:
            try:
                work(*args)
            except Exception:  # telemetry must never disturb serving
                log.exception("deferred telemetry work failed")


class Deferred:
    """A synchronous instrument whose measurements wait in `batch`."""

    def __init__(self, instrument: Any, batch: Batch) -> None:
        self.instrument, self.batch = instrument, batch

    def record(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        self.batch.defer(self.instrument.record, amount, attributes, context)

    def add(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        self.batch.defer(self.instrument.add, amount, attributes, context)


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines formatted and written together: one write and one flush per batch.

    Lines at WARNING and above, and lines logged outside the event loop, are
    written at once (with whatever waits before them); the rest within MAX_AGE_S.
    logging.shutdown flushes what is left when the process exits.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[logging.LogRecord] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self._pending.append(record)
        if record.levelno >= logging.WARNING or len(self._pending) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            empty = contextvars.Context()
            self._timer = loop.call_later(MAX_AGE_S, self._timed_flush, context=empty)

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            records, self._pending = self._pending, []
            lines = []
            for record in records:
                try:
                    lines.append(self.format(record) + self.terminator)
                except Exception:
                    self.handleError(record)
            if lines:
                self.stream.write("".join(lines))
            super().flush()
        finally:
            self.release()
