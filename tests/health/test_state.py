"""In-process checks of the pieces behind the probes: drain sources, stale
results, agent lines and weights. The subprocess tests show the wiring; these
pin down the rules."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from service import node
from service.app import create_app
from service.config import Settings
from service.health.agent import agent_reply
from service.health.checks import HealthChecker, Status
from service.health.drain import ADMIN, FILE, CannotUndrain, DrainController
from service.health.inflight import InFlight
from service.health.lifecycle import Lifecycle, State


def ready_lifecycle() -> Lifecycle:
    lifecycle = Lifecycle()
    assert lifecycle.move(State.ready)
    return lifecycle


def test_the_node_stays_drained_while_any_source_holds_it() -> None:
    drain = DrainController(ready_lifecycle())
    drain.drain(FILE)
    drain.drain(ADMIN)
    with pytest.raises(CannotUndrain, match=r"drain file .* exists"):
        drain.undrain(ADMIN)
    assert drain.lifecycle.state is State.draining
    assert drain.undrain(FILE) is State.ready


def test_a_stop_is_final() -> None:
    drain = DrainController(ready_lifecycle())
    drain.drain(FILE)
    drain.request_stop("SIGTERM")
    for source in (FILE, ADMIN, "SIGTERM"):
        with pytest.raises(CannotUndrain, match="stopping"):
            drain.undrain(source)
    assert drain.lifecycle.state is State.draining


def test_undrain_goes_back_to_what_the_checks_say() -> None:
    drain = DrainController(ready_lifecycle())
    drain.serving_state = lambda: State.degraded
    drain.drain(ADMIN)
    assert drain.undrain(ADMIN) is State.degraded


def state_of(checker: HealthChecker) -> State:
    return checker.lifecycle.state


@pytest.fixture
async def checker(tmp_path: Path) -> AsyncIterator[HealthChecker]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    lifecycle = Lifecycle()
    # Generous bounds: these tests are about what the results mean, not about timing,
    # and a loaded CI machine can take over 0.1 s for a first SQLite connection.
    settings = Settings(max_in_flight=10, health_interval_s=1.0, health_timeout_s=2.0)
    checker = HealthChecker(settings, lifecycle=lifecycle, in_flight=InFlight(), primary=engine)
    await checker.run_once()
    lifecycle.move(checker.target_state())
    yield checker
    await engine.dispose()


async def test_a_stale_result_fails_readiness(checker: HealthChecker) -> None:
    assert checker.readiness() == (True, [])
    primary = checker._results["primary"]
    checker._results["primary"] = replace(primary, checked_at=time.monotonic() - 60)
    ready, failing = checker.readiness()
    assert not ready
    assert [r.name for r in failing] == ["primary"]
    assert "stuck or dead" in failing[0].output
    assert agent_reply(checker.lifecycle, checker).startswith("down#primary last checked")


async def test_a_slow_primary_degrades_after_three_slow_rounds_and_stays_ready(
    checker: HealthChecker,
) -> None:
    checker.db_latency_warn_ms = 0.0
    for _ in range(2):  # a busy node's check answering late for a round or two
        await checker.run_once()
        assert checker.snapshot()["primary"].status is Status.warn
        assert state_of(checker) is State.ready
    await checker.run_once()
    assert state_of(checker) is State.degraded
    assert checker.readiness()[0]
    checker.db_latency_warn_ms = 10_000.0
    await checker.run_once()
    assert state_of(checker) is State.ready


async def test_one_slow_round_in_a_few_does_not_flap_the_node(checker: HealthChecker) -> None:
    moves: list[State] = []
    checker.lifecycle.subscribe(lambda _old, new: moves.append(new))
    for slow in [True, False, True, True, False, True, False]:
        checker.db_latency_warn_ms = 0.0 if slow else 10_000.0
        await checker.run_once()
    assert moves == []
    # The control: degraded on every slow round, as before, it flaps.
    checker.warn_rounds = 1
    for slow in [True, False, True, True, False, True, False]:
        checker.db_latency_warn_ms = 0.0 if slow else 10_000.0
        await checker.run_once()
    assert moves == [State.degraded, State.ready] * 3


async def test_a_failing_primary_degrades_at_once(checker: HealthChecker) -> None:
    await checker.primary.dispose()
    checker.primary = create_async_engine("sqlite+aiosqlite:////nonexistent/dir/h.db")
    await checker.run_once()
    assert checker.snapshot()["primary"].status is Status.fail
    assert state_of(checker) is State.degraded
    assert not checker.readiness()[0]


@pytest.mark.parametrize(("count", "weight"), [(0, 100), (1, 90), (5, 50), (10, 1), (50, 1)])
async def test_agent_weight_follows_in_flight(
    checker: HealthChecker, count: int, weight: int
) -> None:
    checker.in_flight.count = count
    assert agent_reply(checker.lifecycle, checker) == f"up ready {weight}%\n"


async def test_agent_lines_by_state(checker: HealthChecker) -> None:
    lifecycle = checker.lifecycle
    lifecycle.move(State.draining)
    assert agent_reply(lifecycle, checker) == "drain\n"
    lifecycle.move(State.stopping)
    assert agent_reply(lifecycle, checker) == "drain\n"
    lifecycle.move(State.stopped)
    assert agent_reply(lifecycle, checker) == "down#stopped\n"
    starting = Lifecycle()
    checker.lifecycle = starting
    line = agent_reply(starting, checker)
    assert line.startswith("down#lifecycle the node is starting")
    assert line.endswith("\n") and line.count("\n") == 1


async def test_livez_fails_only_when_the_checker_is_dead(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, node_id="in-process"))
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope, receive, send):  # type: ignore[no-untyped-def]
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
            assert (await http.get("/livez")).status_code == 200
            checker: HealthChecker = state["health"]
            assert checker._task is not None
            checker._task.cancel()
            await asyncio.sleep(0)
            assert (await http.get("/livez")).status_code == 503
            assert node.in_flight(app).count == 0
