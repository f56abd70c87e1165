"""What a finished request leaves for the metrics and the access log, recorded in batches.

The request path appends one tuple and returns. Recording it (a histogram
measurement through the OTel SDK, a JSON line) happens for many requests at
once: interleaved with the work of serving, each of those steps ran several
times slower than in a tight loop over a batch, because serving has evicted
their code and data from the CPU's caches by the time a request ends. On a
CPU-bound node that was most of what default telemetry cost (measured in
docs/results/telemetry-overhead.md).

A batch is recorded when its oldest request is `MAX_AGE_S` old, when it
holds `MAX_BATCH` requests, before /metrics is collected (a scrape sees every
request that has finished) and when the node stops. So an access-log line is
written at most `MAX_AGE_S` after its request ended, and a node killed with
SIGKILL loses at most that much of its log.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from service.telemetry.handwritten.logs import AccessLog
    from service.telemetry.handwritten.metrics import HttpInstruments

log = logging.getLogger("service.telemetry")

MAX_AGE_S = 0.05
MAX_BATCH = 256


class CompletedRequest(NamedTuple):
    ended: float  # time.time() when the response was done
    method: str
    path: str
    route: str  # the route template, or UNMATCHED_ROUTE
    status: int
    duration_s: float
    client: str | None
    trace_id: int  # of the request's server span; 0: none
    span_id: int
    replayed: bool  # an idempotent replay (counted on its own)
    logged: bool  # goes to the access log (probes only when they fail)


class RequestRecorder:
    """Collects CompletedRequests and records them in batches (see the module)."""

    def __init__(self) -> None:
        # Set by Telemetry once it starts (instruments) and from the settings.
        self.http: HttpInstruments | None = None
        self.access_log: AccessLog | None = None
        self._pending: list[CompletedRequest] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, request: CompletedRequest) -> None:
        pending = self._pending
        pending.append(request)
        if len(pending) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop: nothing would fire a timer
                self.flush()
                return
            # An empty context: the batch belongs to no request, whereas the
            # one being finished here would otherwise be current in flush().
            self._timer = loop.call_later(MAX_AGE_S, self.flush, context=contextvars.Context())

    def flush(self) -> None:
        """Record every pending request now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._record(batch)
        except Exception:  # telemetry must never disturb serving
            log.exception("recording telemetry for %d requests failed", len(batch))

    def _record(self, batch: list[CompletedRequest]) -> None:
        http = self.http
        if http is not None:
            for request in batch:
                http.record(request.method, request.route, request.status, request.duration_s)
                if request.replayed:
                    http.replayed(request.route)
        access_log = self.access_log
        if access_log is not None:
            access_log.write([request for request in batch if request.logged])
