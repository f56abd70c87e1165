"""Dependency checks run in the background on an interval; probes only read the results.

A probe that queried the database would turn every proxy's health check into
load on the shared backend (N nodes x M proxies x 1/interval), and would make
readiness as slow as the slowest query. So one task per node checks the
dependencies every `CATTLE_HEALTH_INTERVAL_S`, each check bounded by
`CATTLE_HEALTH_TIMEOUT_S`, and /readyz, /healthz and the agent port read the
cached results. Checks that cost nothing (lifecycle state, in-flight count,
uptime, the replica monitor's last verdict) are computed when read.

A cached result older than a few intervals counts as failed: a checker that
is stuck or dead must not keep reporting the last good answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings, env_var
from service.db.pool import PoolWatch
from service.db.replicas import ReplicaSet
from service.health.inflight import InFlight
from service.health.lifecycle import Lifecycle, State
from service.tasks import cancel_within
from service.telemetry.exporting import ExportStatus

log = logging.getLogger("service.health")


class Status(StrEnum):
    """The three words of application/health+json."""

    ok = "pass"
    warn = "warn"
    fail = "fail"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One observation. `critical` results that fail make the node unready."""

    name: str  # the <check> of /readyz/<check>
    key: str  # the application/health+json key, "component:measurement"
    component_type: str
    status: Status
    critical: bool
    observed_value: float | int | str | None = None
    observed_unit: str | None = None
    output: str = ""  # why, when not passing
    checked_at: float = 0.0  # time.monotonic(), for staleness
    checked_wall: float = 0.0  # time.time(), for the "time" field

    def to_health_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "componentType": self.component_type,
            "status": str(self.status),
            "critical": self.critical,
            "time": datetime.fromtimestamp(self.checked_wall, UTC).isoformat(
                timespec="milliseconds"
            ),
        }
        if self.observed_value is not None:
            entry["observedValue"] = self.observed_value
        if self.observed_unit is not None:
            entry["observedUnit"] = self.observed_unit
        if self.output:
            entry["output"] = self.output
        return entry

    def line(self) -> str:
        """One line of /readyz?verbose, in the style of the Kubernetes API server."""
        mark = "-" if self.status is Status.fail else "+"
        shown = ""
        if self.observed_value is not None:
            unit = f" {self.observed_unit}" if self.observed_unit else ""
            shown = f" ({self.observed_value}{unit})"
        word = {Status.ok: "ok", Status.warn: "warn", Status.fail: "failed"}[self.status]
        why = f": {self.output}" if self.output else ""
        return f"[{mark}]{self.name} {word}{shown}{why}"


BackgroundCheck = Callable[[], Awaitable[CheckResult]]


class HealthChecker:
    """Runs the background checks and answers every probe from memory."""

    def __init__(
        self,
        settings: Settings,
        *,
        lifecycle: Lifecycle,
        in_flight: InFlight,
        primary: AsyncEngine,
        replicas: ReplicaSet | None = None,
        telemetry_status: Callable[[], ExportStatus] | None = None,
        pool: PoolWatch | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        # Request-pool exhaustion, counted by the database layer; read from memory.
        self.pool = pool
        # Read from memory: the exporter threads record their own outcomes.
        self.telemetry_status = telemetry_status
        self.in_flight = in_flight
        self.primary = primary
        # Checked by the replica monitor (service/db/replicas.py); read here from memory.
        self.replicas = replicas if replicas is not None and replicas.replicas else None
        self.replica_stale_after_s = 3 * settings.replica_check_interval_s + (
            replicas.check_timeout_s if replicas is not None else 0.0
        )
        self.interval_s = settings.health_interval_s
        self.timeout_s = settings.health_timeout_s
        self.max_in_flight = settings.max_in_flight
        self.db_latency_warn_ms = settings.health_db_latency_warn_ms
        self.loop_lag_warn_ms = settings.health_loop_lag_warn_ms
        self.warn_rounds = settings.health_warn_rounds
        self._warned_rounds = 0  # rounds in a row whose checks did not all pass
        # Three missed rounds: long enough to ride out one slow round under CPU
        # pressure, short enough that a dead checker is noticed within seconds.
        self.stale_after_s = 3 * self.interval_s + self.timeout_s
        self.started_at = time.monotonic()
        self.checks: list[BackgroundCheck] = [self.check_primary]
        self._results: dict[str, CheckResult] = {}
        self._task: asyncio.Task[None] | None = None

    # -- running -------------------------------------------------------------

    async def start(self) -> None:
        """First round in the foreground, so a node is never READY on no evidence."""
        self._results["event_loop"] = self._loop_result(0.0)
        await self.run_once()
        self._task = asyncio.create_task(self._run(), name="health-checks")

    async def stop(self, timeout_s: float) -> None:
        await cancel_within(self._task, timeout_s)

    @property
    def alive(self) -> bool:
        """False once the background task has died: the node can no longer see itself."""
        return self._task is not None and not self._task.done()

    async def run_once(self) -> None:
        results = await asyncio.gather(*(self._guarded(check) for check in self.checks))
        for result in results:
            previous = self._results.get(result.name)
            if previous is not None and previous.status is not result.status:
                level = logging.INFO if result.status is Status.ok else logging.WARNING
                log.log(level, "check %s: %s -> %s %s", result.name, previous.status,
                        result.status, result.output)  # fmt: skip
            self._results[result.name] = result
        self.follow_checks()

    async def _guarded(self, check: BackgroundCheck) -> CheckResult:
        # Each check bounds itself; this is the backstop for one that does not.
        try:
            return await asyncio.wait_for(check(), self.timeout_s + 1.0)
        except TimeoutError:
            name = getattr(check, "__name__", "check").removeprefix("check_")
            return self._failed(name, f"did not finish within {self.timeout_s + 1.0:.1f} s")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval_s)
            # How late the sleep woke up is how long something held the loop.
            lag_s = max(0.0, loop.time() - before - self.interval_s)
            self._results["event_loop"] = self._loop_result(lag_s)
            try:
                await self.run_once()
            except Exception:  # the next round tries again; the checker must not die
                log.exception("health check round failed")

    def follow_checks(self) -> None:
        """READY <-> DEGRADED follows the checks; other states belong to start and drain."""
        results = list(self._dependencies().values())
        passing = all(r.status is Status.ok for r in results)
        self._warned_rounds = 0 if passing else self._warned_rounds + 1
        if self.lifecycle.state in (State.ready, State.degraded):
            self.lifecycle.move(self._target(results))

    def target_state(self) -> State:
        """Where a serving node belongs: READY when every dependency check passes;
        DEGRADED at once when one fails, and when one has warned for `warn_rounds`
        rounds in a row. A warning is often the node's own load: a check that
        waits its turn on a saturated event loop answers late, for a round or
        two, then not. Degraded on each of those, a busy node flapped READY <->
        DEGRADED again and again, logging and announcing each move to its
        peers. Once DEGRADED, a node stays so until a round passes whole."""
        return self._target(list(self._dependencies().values()))

    def _target(self, results: list[CheckResult]) -> State:
        if all(r.status is Status.ok for r in results):
            return State.ready
        if any(r.status is Status.fail for r in results) or self._warned_rounds >= self.warn_rounds:
            return State.degraded
        return State.degraded if self.lifecycle.state is State.degraded else State.ready

    # -- the checks ----------------------------------------------------------

    async def check_primary(self) -> CheckResult:
        """`SELECT 1` on the primary through the checker's own one-connection pool.

        The checker's pool is separate from the request pool so that a node
        busy enough to exhaust its pool is not mistaken for one whose
        database is gone (all nodes would drop out at once under load).
        """
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.primary.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except TimeoutError:
            return self._failed(
                "primary",
                f"no answer within {self.timeout_s} s ({env_var('health_timeout_s')})",
            )
        except Exception as exc:  # whatever the driver raises, the primary is not usable
            return self._failed("primary", f"unreachable: {_describe(exc)}")
        return self._timed(
            "primary", time.perf_counter() - started, self.db_latency_warn_ms, "slower than"
        )

    def _loop_result(self, lag_s: float) -> CheckResult:
        return self._timed("event_loop", lag_s, self.loop_lag_warn_ms, "blocked for more than")

    def _timed(self, name: str, seconds: float, warn_ms: float, warning: str) -> CheckResult:
        """A duration in ms: ok, or warn (with why) when it is over `warn_ms`."""
        observed_ms = round(seconds * 1000, 3)
        slow = observed_ms > warn_ms
        return self._result(
            name,
            Status.warn if slow else Status.ok,
            observed_ms,
            "ms",
            output=f"{warning} {warn_ms} ms" if slow else "",
        )

    def _result(
        self,
        name: str,
        status: Status,
        value: float | int | str | None,
        unit: str | None,
        *,
        output: str = "",
    ) -> CheckResult:
        # A check added later without an entry in _KINDS is critical by default.
        key, component_type, critical = _KINDS.get(name, (name, "component", True))
        return CheckResult(
            name=name,
            key=key,
            component_type=component_type,
            status=status,
            critical=critical,
            observed_value=value,
            observed_unit=unit,
            output=output,
            checked_at=time.monotonic(),
            checked_wall=time.time(),
        )

    def _failed(self, name: str, output: str) -> CheckResult:
        return self._result(name, Status.fail, None, None, output=output)

    # -- reading (what probes call: memory only) -----------------------------

    def _fresh(self) -> dict[str, CheckResult]:
        now = time.monotonic()
        fresh = {}
        for name, result in self._results.items():
            age_s = now - result.checked_at
            if age_s > self.stale_after_s:
                result = replace(
                    result,
                    status=Status.fail,
                    output=f"last checked {age_s:.1f} s ago; the checker is stuck or dead",
                )
            fresh[name] = result
        return fresh

    def _dependencies(self) -> dict[str, CheckResult]:
        """What READY <-> DEGRADED follows: the cached checks, and the replicas."""
        results = self._fresh()
        if self.replicas is not None:
            results["replicas"] = self._replicas_result(self.replicas)
        if self.pool is not None:
            results["pool"] = self._pool_result(self.pool)
        return results

    def _pool_exhausted(self) -> bool:
        # As long as a stale check counts: long enough for every proxy's
        # agent check to see it, short enough to recover within seconds.
        return self.pool is not None and self.pool.exhausted_within(self.stale_after_s)

    def _pool_result(self, pool: PoolWatch) -> CheckResult:
        # Exhaustion degrades the node and lowers its weight, never makes it
        # unready: every node under the same burst would drop out at once.
        exhausted = self._pool_exhausted()
        return self._result(
            "pool",
            Status.warn if exhausted else Status.ok,
            pool.exhausted_total,
            "requests",
            output=f"requests found the pool exhausted ({env_var('db_pool_size')})"
            if exhausted
            else "",
        )

    def _replicas_result(self, replicas: ReplicaSet) -> CheckResult:
        # Out-of-rotation replicas degrade the node (reads fall back to the
        # primary) but never make it unready.
        now = time.monotonic()
        out = [f"{r.name} out of rotation: {r.error}" for r in replicas.replicas if not r.usable]
        out += [
            f"{r.name} not checked for {now - r.checked_at:.1f} s"
            for r in replicas.replicas
            if r.usable and now - r.checked_at > self.replica_stale_after_s
        ]
        lags = [r.lag_s for r in replicas.replicas if r.usable and r.lag_s is not None]
        return self._result(
            "replicas",
            Status.warn if out else Status.ok,
            round(max(lags), 3) if lags else None,
            "s" if lags else None,
            output="; ".join(out),
        )

    def snapshot(self) -> dict[str, CheckResult]:
        """Every check, the cached ones marked failed when stale, the live ones computed now."""
        fresh = self._dependencies()
        state = self.lifecycle.state
        if state is State.ready:
            lifecycle = self._result("lifecycle", Status.ok, str(state), None)
        elif state is State.degraded:
            warned = ", ".join(n for n, r in fresh.items() if r.status is not Status.ok)
            lifecycle = self._result(
                "lifecycle", Status.warn, str(state), None, output=f"degraded by {warned}"
            )
        else:
            lifecycle = self._result(
                "lifecycle", Status.fail, str(state), None, output=f"the node is {state}"
            )
        busy = self.in_flight.count >= self.max_in_flight
        in_flight = self._result(
            "in_flight",
            Status.warn if busy else Status.ok,
            self.in_flight.count,
            "requests",
            output=f"at or above {env_var('max_in_flight')}={self.max_in_flight}" if busy else "",
        )
        uptime = self._result(
            "uptime", Status.ok, round(time.monotonic() - self.started_at, 3), "s"
        )
        extra = {}
        if self.telemetry_status is not None:
            # A collector that is down is worth a warning, never a reason to stop serving.
            export = self.telemetry_status()
            extra["telemetry"] = self._result(
                "telemetry",
                Status.ok if export.ok else Status.warn,
                export.status,
                None,
                output=export.last_error or "" if not export.ok else "",
            )
        return {
            "lifecycle": lifecycle,
            **fresh,
            "in_flight": in_flight,
            **extra,
            "uptime": uptime,
        }

    def readiness(self) -> tuple[bool, list[CheckResult]]:
        """(ready, the critical checks that fail): READY or DEGRADED and primary reachable."""
        failing = [r for r in self.snapshot().values() if r.critical and r.status is Status.fail]
        return not failing, failing

    def weight_percent(self) -> int:
        """The HAProxy agent weight: the share of CATTLE_MAX_IN_FLIGHT still free.

        Never below 1 %: a busy but healthy node should get less new work,
        not none (weight 0 is what `drain` is for). 1 % while its database
        pool has lately been exhausted.
        """
        if self._pool_exhausted():
            return 1  # it is turning requests away already: send it the least
        free = 1.0 - self.in_flight.count / self.max_in_flight
        return max(1, min(100, round(100 * free)))


# name -> (application/health+json key, componentType, critical)
_KINDS: dict[str, tuple[str, str, bool]] = {
    "lifecycle": ("lifecycle:state", "system", True),
    "primary": ("primary:responseTime", "datastore", True),
    "event_loop": ("event_loop:lag", "system", False),
    "replicas": ("replicas:lag", "datastore", False),
    "pool": ("pool:exhausted", "datastore", False),
    "in_flight": ("http:inFlight", "system", False),
    "uptime": ("uptime", "system", False),
    "telemetry": ("telemetry:export", "component", False),
}


def _describe(exc: BaseException) -> str:
    # SQLAlchemy wraps the driver's error and appends a help link; the driver's
    # first line is what an operator needs.
    inner = getattr(exc, "orig", None) or exc
    first = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    return f"{type(inner).__name__}: {first}"[:200]
