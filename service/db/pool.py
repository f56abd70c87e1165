"""Pool exhaustion: counted for /metrics, logged at a bounded rate, seen by health.

A request that waited db_pool_timeout_s for a pooled connection and got none
is answered 503; a node in that state should get less new work (its agent
weight drops) and an operator should hear of it without a log line per
request.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("service.db.pool")


class PoolWatch:
    """How often checkouts found the pool exhausted, and when it last happened."""

    def __init__(self, *, log_interval_s: float = 10.0) -> None:
        self.exhausted_total = 0
        self.last_exhausted_at: float | None = None  # monotonic
        self.log_interval_s = log_interval_s
        self._logged_at: float | None = None
        self._unlogged = 0

    def exhausted(self, error: BaseException) -> None:
        now = time.monotonic()
        self.exhausted_total += 1
        self.last_exhausted_at = now
        self._unlogged += 1
        # One line per interval, saying how many it stands for: a burst that
        # exhausts the pool must not also flood the log.
        if self._logged_at is None or now - self._logged_at >= self.log_interval_s:
            log.warning(
                "database pool exhausted: %d request(s) got no connection "
                "within the pool timeout since the last report (%s)",
                self._unlogged,
                str(error).splitlines()[0][:200],
            )
            self._logged_at = now
            self._unlogged = 0

    def exhausted_within(self, seconds: float) -> bool:
        last = self.last_exhausted_at
        return last is not None and time.monotonic() - last <= seconds
