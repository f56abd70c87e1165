"""A keyed write holds one pooled connection, so a burst cannot starve the pool.

On PostgreSQL a keyed request holds its key's advisory lock on a connection
for the whole request. If the work needed a second connection, a burst as
large as the pool would hold every connection for locks and wait for the
rest: 503s. With a pool of one connection (and one of overflow) a burst of
keyed requests shows it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from service.app import create_app
from service.config import Settings
from service.db.engines import Database
from tests import hardening
from tests.conftest import serve_asgi
from tests.idempotency.test_http import PATH, Work, node

# The key's lock, and the connection it holds, exist on PostgreSQL only.
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

BURST = 12


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # db_pool_size=1 allows 2 connections (max_overflow = pool size).
    return settings.model_copy(update={"db_pool_size": 1, "db_pool_timeout_s": 3.0})


async def test_a_burst_of_keyed_writes_needs_one_connection_each(settings):
    work = Work(delay_s=0.05)
    async with node(settings, work) as client:
        started = time.monotonic()
        responses = await asyncio.gather(
            *(
                client.post(PATH, json={"text": str(i)}, headers={"Idempotency-Key": f"b-{i}"})
                for i in range(BURST)
            )
        )
        waited = time.monotonic() - started
        healthy = (await client.get("/readyz")).status_code == 200
    statuses = [r.status_code for r in responses]
    assert statuses == [201] * BURST, [r.text for r in responses if r.status_code != 201]
    assert sorted(work.runs) == sorted(str(i) for i in range(BURST))
    hardening.record(
        "burst",
        f"{BURST} keyed writes at once, a pool of 1 (+1 overflow)",
        answer=f"201 x{BURST}",
        wait_s=waited,
        healthy=healthy,
        audit=f"{BURST} runs, one per key",
        backend="postgres",
    )


async def test_pool_exhaustion_is_logged_counted_and_lowers_the_weight(settings, caplog):
    settings = settings.model_copy(update={"db_pool_timeout_s": 0.2})
    caplog.set_level(logging.WARNING, logger="service.db.pool")
    app_work = Work()
    app = create_app(settings, domains_served=())
    app.include_router(app_work.router())
    async with serve_asgi(app) as (client, state):
        database: Database = state["database"]
        checker = state["health"]
        assert checker.weight_percent() == 100
        # Every connection the pool may open, held elsewhere.
        held = [await database.writer.connect() for _ in range(2)]
        started = time.monotonic()
        try:
            responses = [
                await client.post(PATH, json={"text": "x"}, headers={"Idempotency-Key": f"e-{i}"})
                for i in range(3)
            ]
        finally:
            waited = time.monotonic() - started
            for connection in held:
                await connection.close()
        assert [r.status_code for r in responses] == [503] * 3
        assert all(r.headers["retry-after"] for r in responses)
        assert database.pool_watch.exhausted_total == 3
        # Logged once for the burst, not once per request.
        lines = [r for r in caplog.records if "pool exhausted" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert checker.weight_percent() == 1
        assert checker.snapshot()["pool"].status == "warn"
        metrics = (await client.get("/metrics")).text
        assert "db_pool_exhausted" in metrics
        (line,) = [
            x for x in metrics.splitlines() if "db_pool_exhausted" in x and not x.startswith("#")
        ]
        assert float(line.rsplit(" ", 1)[1]) == 3
        hardening.record(
            "database fault",
            "every pool connection held elsewhere: 3 keyed writes",
            answer=" / ".join(
                sorted(
                    {
                        hardening.answer_of(r.status_code, r.headers["content-type"], r.content)
                        + " + Retry-After"
                        for r in responses
                    }
                )
            ),
            wait_s=waited,
            # Still in rotation, with its weight lowered (the point of the test).
            healthy=(await client.get("/readyz")).status_code == 200,
            audit="counted 3, logged once, weight 1%",
            backend="postgres",
        )
