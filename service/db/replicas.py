"""Streaming replicas: how far behind each one is, and which may serve a read.

A background task polls every replica (and the primary's WAL position) on an
interval; reads consult the cached result, so routing costs no round trip.
A replica is usable when it is in recovery, reachable, and its replay lag is
within CATTLE_REPLICA_MAX_LAG_S. Unreachable or lagging replicas are skipped
and come back by themselves at the next check that finds them fine.

Lag is measured against the primary positions the checks saw: how long
before the primary's last known moment the primary was last at a position
the replica has replayed. While the primary is down, that moment is the last
check that reached it, so a replica that had caught up stays fresh and keeps
serving reads (a primary that is down takes no writes for it to miss);
"time since the replica last replayed" would grow without end instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.consistency import parse_lsn

log = logging.getLogger("service.db.replicas")

_REPLICA_QUERY = text(
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
    "EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8"
)


@dataclass
class Replica:
    name: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    replay_lsn: int | None = None
    lag_s: float | None = None
    lag_bytes: int | None = None
    usable: bool = False
    error: str | None = None
    checked_at: float = field(default=0.0)

    def mark_unreachable(self, error: BaseException) -> None:
        """Take the replica out of rotation now, not at the next check."""
        self.usable = False
        self.error = f"{type(error).__name__}: {error}"[:300]


def replica_name(url: str, index: int) -> str:
    parsed = make_url(url)
    return f"replica{index + 1}@{parsed.host or 'local'}:{parsed.port or 5432}"


class ReplicaSet:
    def __init__(
        self,
        primary: AsyncEngine,
        replicas: Sequence[tuple[str, AsyncEngine]],
        *,
        max_lag_s: float,
        check_timeout_s: float = 1.0,
    ) -> None:
        self.primary = primary
        self.replicas = [
            Replica(name, engine, async_sessionmaker(engine, expire_on_commit=False))
            for name, engine in replicas
        ]
        self.max_lag_s = max_lag_s
        self.check_timeout_s = check_timeout_s
        self.primary_lsn: int | None = None
        # (monotonic time, primary WAL position) of recent checks that reached
        # the primary, oldest first; kept for a little over the lag bound.
        self._positions: deque[tuple[float, int]] = deque()
        self._primary_reached = False
        self._turn = itertools.count()

    @property
    def degraded(self) -> bool:
        """Some replica is out of rotation: reads still work, with less headroom."""
        return any(not r.usable for r in self.replicas)

    def usable(self, min_lsn: int | None = None) -> list[Replica]:
        return [
            r
            for r in self.replicas
            if r.usable
            and (min_lsn is None or (r.replay_lsn is not None and r.replay_lsn >= min_lsn))
        ]

    def pick(self, min_lsn: int | None = None) -> Replica | None:
        """Round-robin over usable replicas that have replayed `min_lsn` (if given)."""
        candidates = self.usable(min_lsn)
        if not candidates:
            return None
        return candidates[next(self._turn) % len(candidates)]

    async def check(self) -> None:
        """Refresh every replica's position and lag (bounded by the check timeout)."""
        try:
            async with asyncio.timeout(self.check_timeout_s), self.primary.connect() as conn:
                self.primary_lsn = parse_lsn(
                    await conn.scalar(text("SELECT pg_current_wal_lsn()::text"))
                )
        except Exception:  # the primary's own check reports this; keep the last value
            log.debug("primary WAL position unavailable", exc_info=True)
            self._primary_reached = False
        else:
            self._primary_reached = True
            self._remember(time.monotonic(), self.primary_lsn)
        await asyncio.gather(*(self._check_one(r) for r in self.replicas))

    async def _check_one(self, replica: Replica) -> None:
        try:
            async with asyncio.timeout(self.check_timeout_s), replica.engine.connect() as conn:
                in_recovery, replay, replay_age_s = (await conn.execute(_REPLICA_QUERY)).one()
        except Exception as exc:
            if replica.usable:
                log.warning("replica %s out of rotation: %s", replica.name, exc)
            replica.mark_unreachable(exc)
            replica.checked_at = time.monotonic()
            return
        replica.checked_at = time.monotonic()
        replica.replay_lsn = parse_lsn(replay) if replay else None
        if not in_recovery or replica.replay_lsn is None:
            replica.usable = False
            replica.error = "not a streaming standby (promoted, or not in recovery)"
            return
        primary = self.primary_lsn
        if primary is not None and replica.replay_lsn >= primary:
            replica.lag_s, replica.lag_bytes = 0.0, 0
        elif self._positions:
            replica.lag_bytes = None if primary is None else primary - replica.replay_lsn
            replica.lag_s = self.lag_s(replica.replay_lsn, replay_age_s)
        else:
            # The primary was never reached: how long ago it last replayed a transaction.
            replica.lag_bytes = None
            replica.lag_s = float(replay_age_s) if replay_age_s is not None else float("inf")
        was_usable = replica.usable
        replica.usable = replica.lag_s <= self.max_lag_s
        replica.error = None if replica.usable else f"replay lag {replica.lag_s:.1f} s"
        if replica.usable != was_usable:
            log.info(
                "replica %s %s rotation (lag %.2f s)",
                replica.name,
                "back in" if replica.usable else "out of",
                replica.lag_s,
            )

    def _remember(self, now: float, position: int) -> None:
        self._positions.append((now, position))
        # Samples older than twice the bound are not needed to tell a lag past
        # the bound; the newest one is always kept.
        while len(self._positions) > 1 and now - self._positions[1][0] > 2 * self.max_lag_s:
            self._positions.popleft()

    def lag_s(self, replay_lsn: int, replay_age_s: float | None = None) -> float:
        """How far `replay_lsn` is behind the primary as last known, in seconds.

        The reference is now while the primary answers, else the last check
        that reached it. The lag is the time from the newest known moment the
        primary was at or below `replay_lsn` to that reference: the replica
        holds everything the primary held then (an upper bound, by at most
        one check interval). Behind every remembered position, it is at least
        as old as the oldest one; until the memory spans the bound, the time
        since it last replayed a transaction (`replay_age_s`) stands in.
        """
        reference = time.monotonic() if self._primary_reached else self._positions[-1][0]
        if replay_lsn >= self._positions[-1][1]:
            return 0.0
        caught_up = [at for at, position in self._positions if position <= replay_lsn]
        if caught_up:
            return max(0.0, reference - caught_up[-1])
        oldest = self._positions[0][0]
        if self._positions[-1][0] - oldest >= 2 * self.max_lag_s or replay_age_s is None:
            return max(0.0, reference - oldest)
        return max(reference - oldest, float(replay_age_s))

    async def run(self, interval_s: float) -> None:
        while True:
            await self.check()
            await asyncio.sleep(interval_s)

    async def dispose(self) -> None:
        await asyncio.gather(*(r.engine.dispose() for r in self.replicas))
