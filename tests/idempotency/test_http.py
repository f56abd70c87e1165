"""The idempotency entry point, through a write route this module mounts itself.

No domain is involved: the route's work records each run in memory, so "done
once" is counted directly, on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.app import create_app
from service.config import Settings
from service.db.engines import Database
from service.db.types import utcnow
from service.idempotency import service as idempotency
from service.idempotency.http import IdempotentWriteDep
from service.idempotency.models import IdempotencyRecord
from tests.conftest import serve_asgi

PATH = "/echo"
N = 16


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class Work:
    """What the route does, and a record of every time it really did it."""

    def __init__(self, *, delay_s: float = 0.0, failures: int = 0) -> None:
        self.delay_s = delay_s
        self.failures = failures
        self.runs: list[str] = []

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.post(PATH, status_code=201)
        async def echo(payload: Echo, write: IdempotentWriteDep) -> Response:
            async def work(session: AsyncSession) -> Response:
                await asyncio.sleep(self.delay_s)
                await session.execute(text("SELECT 1"))
                if self.failures:
                    self.failures -= 1
                    raise RuntimeError("the work failed")
                self.runs.append(payload.text)
                run = len(self.runs)
                return JSONResponse(
                    {"text": payload.text, "run": run},
                    status_code=201,
                    headers={"Location": f"{PATH}/{run}"},
                )

            return await write.run(work, body=payload)

        return router


@contextlib.asynccontextmanager
async def node(settings: Settings, work: Work) -> AsyncIterator[httpx.AsyncClient]:
    """A node serving no domain, only the module's route."""
    app = create_app(settings, domains_served=())
    app.include_router(work.router())
    async with serve_asgi(app) as (http, _):
        yield http


async def post(client: httpx.AsyncClient, text: str = "a", key: str | None = "k") -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await client.post(PATH, json={"text": text}, headers=headers)


def assert_problem(response: httpx.Response, status: int, detail_contains: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert detail_contains.lower() in response.json()["detail"].lower()


@pytest.fixture
def work() -> Work:
    return Work()


@pytest.fixture
async def client(settings: Settings, work: Work) -> AsyncIterator[httpx.AsyncClient]:
    async with node(settings, work) as http:
        yield http


# -- replay, refusal ------------------------------------------------------------


async def test_same_key_same_body_replays_the_first_response(client, work):
    first = await post(client, key="k-1")
    again = await post(client, key="k-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    # Both carry a token: the replay's covers the first write.
    assert first.headers["consistency-token"] and again.headers["consistency-token"]
    assert work.runs == ["a"]


async def test_key_replay_ignores_json_formatting(client, work):
    first = await post(client, key="fmt")
    again = await client.post(
        PATH,
        content=b'{ "text":\n "a" }',
        headers={"Idempotency-Key": "fmt", "Content-Type": "application/json"},
    )
    assert again.status_code == 201 and again.json() == first.json()
    assert work.runs == ["a"]


async def test_same_key_other_body_is_422(client, work):
    await post(client, "a", key="k-2")
    response = await post(client, "different", key="k-2")
    assert_problem(response, 422, "different request body")
    assert work.runs == ["a"]


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there"])
async def test_malformed_idempotency_key_is_rejected(client, key):
    response = await post(client, key=key)
    assert_problem(response, 422, "idempotency-key")


async def test_without_a_key_every_request_does_the_work(client, work):
    responses = [await post(client, key=None) for _ in range(2)]
    assert [r.status_code for r in responses] == [201, 201]
    assert all(r.headers["consistency-token"] for r in responses)
    assert work.runs == ["a", "a"]


async def test_a_failed_request_gives_its_key_back(settings):
    work = Work(failures=1)
    async with node(settings, work) as client:
        failed = await post(client, key="k-fail")
        assert failed.status_code == 500
        # Released at once: the retry does the work instead of waiting out the lease.
        retried = await post(client, key="k-fail")
    assert retried.status_code == 201
    assert work.runs == ["a"]


# -- in flight, dead holders, expired leases --------------------------------------


async def _claim_elsewhere(settings: Settings, key: str, *, lease_s: float, hold: bool) -> Any:
    """Claim `key` as another node would; with `hold`, that node is still alive."""
    database = Database(settings)
    stack = contextlib.AsyncExitStack()
    lock = idempotency.KeyLock(idempotency.Holder.UNKNOWN)
    if hold:
        lock = await stack.enter_async_context(idempotency.key_lock(database, key))
    await idempotency.claim(
        database,
        key=key,
        fingerprint=idempotency.fingerprint("POST", PATH, {"text": "a"}),
        lease_s=lease_s,
        ttl_s=3600,
        holder=lock.holder,
        connection=lock.connection,
    )

    async def release() -> None:
        await stack.aclose()
        await database.dispose()

    return release


async def test_same_key_in_flight_is_409_with_retry_after(client, settings, work):
    release = await _claim_elsewhere(settings, "k-3", lease_s=30, hold=True)
    try:
        response = await post(client, key="k-3")
    finally:
        await release()
    assert_problem(response, 409, "still being processed")
    assert int(response.headers["retry-after"]) >= 1
    assert work.runs == []


async def test_key_of_a_dead_node_is_taken_over(client, settings, work):
    """The node that claimed the key died mid-request (its connections closed)."""
    release = await _claim_elsewhere(settings, "k-dead", lease_s=30, hold=True)
    await release()  # what the death of its process does to its lock
    response = await post(client, key="k-dead")
    if settings.is_sqlite:
        # No lock outlives a node on SQLite: the lease must run out first.
        assert_problem(response, 409)
        assert work.runs == []
    else:
        assert response.status_code == 201, response.text
        assert work.runs == ["a"]


async def test_expired_lease_is_taken_over(client, settings, work):
    release = await _claim_elsewhere(settings, "k-old", lease_s=0.001, hold=False)
    await release()
    response = await post(client, key="k-old")
    assert response.status_code == 201
    assert work.runs == ["a"]


async def test_stored_keys_expire(client, settings, work):
    first = await post(client, key="old")
    database = Database(settings)
    try:
        # Retention ends: the purge removes the record ...
        async with database.write() as session:
            await session.execute(update(IdempotencyRecord).values(expires_at=utcnow()))
        assert await idempotency.purge_expired(database) == 1
    finally:
        await database.dispose()
    # ... and the same key then starts a new request.
    again = await post(client, key="old")
    assert again.status_code == 201 and again.json()["run"] != first.json()["run"]
    assert "idempotent-replayed" not in again.headers
    assert work.runs == ["a", "a"]


# -- races ------------------------------------------------------------------------


async def _race(client: httpx.AsyncClient, key: str | None = "race") -> list[httpx.Response]:
    return await asyncio.gather(*(post(client, "once", key=key) for _ in range(N)))


def _fresh(responses: list[httpx.Response]) -> list[httpx.Response]:
    return [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]


async def test_concurrent_requests_with_one_key_do_the_work_once(settings):
    # Waiting less than the work takes: the others are told it is in flight.
    work = Work(delay_s=0.3)
    async with node(settings.model_copy(update={"idempotency_wait_s": 0.05}), work) as client:
        responses = await _race(client)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {201, 409}, statuses
        assert 409 in statuses, statuses
        assert len(_fresh(responses)) == 1, statuses
        assert len({r.json()["run"] for r in responses if r.status_code == 201}) == 1
        assert work.runs == ["once"]
        # Once the winner finished, every retry gets its response.
        replay = (await _race(client))[0]
        assert replay.status_code == 201
        assert replay.json() == _fresh(responses)[0].json()
    assert work.runs == ["once"]


async def test_the_same_race_without_a_key_does_the_work_per_request(settings):
    """The unprotected case: the key is what makes the race above do the work once."""
    work = Work()
    async with node(settings, work) as client:
        responses = await _race(client, key=None)
    assert [r.status_code for r in responses] == [201] * N
    assert len({r.json()["run"] for r in responses}) == N
    assert work.runs == ["once"] * N


async def test_requests_that_wait_for_an_in_flight_key_get_its_response(settings):
    work = Work(delay_s=0.3)
    async with node(settings, work) as client:
        responses = await _race(client)
    statuses = [r.status_code for r in responses]
    assert len(_fresh(responses)) == 1
    assert len({r.json()["run"] for r in responses if r.status_code == 201}) == 1
    assert work.runs == ["once"]
    if settings.is_sqlite:
        # No lock to wait on: a key in flight is 409 at once.
        assert 409 in statuses, statuses
    else:
        # They waited on the key's lock (idempotency_wait_s) and replayed.
        assert statuses == [201] * N, statuses


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_the_same_race_with_the_key_lock_disabled_does_the_work_more_than_once(
    settings, monkeypatch
):
    """The control of the race above: without the key's lock (each request
    believing it holds it), in-flight keys are taken over and the work runs
    again, so the lock is what makes the protected race do it once."""
    monkeypatch.setattr(idempotency, "LOCKING", False)
    work = Work(delay_s=0.3)
    async with node(settings.model_copy(update={"idempotency_wait_s": 0.05}), work) as client:
        responses = await _race(client)
    assert len(work.runs) > 1, [r.status_code for r in responses]


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_keyed_write_is_three_transactions_and_two_statements_on_the_driver(
    settings, work, monkeypatch
):
    """What a keyed write sends besides its statements: the lock, the claim and
    the work are a transaction each; the token and the unlock read no table
    and go on the driver alone, one round trip each (through the engine each
    was a transaction of its own: two round trips more apiece)."""
    sent: list[tuple[str, str]] = []

    def counted(name: str) -> Any:
        original = getattr(asyncpg.connection.Connection, name)

        async def call(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            sent.append((name, " ".join(str(query).split()).rstrip(";").split("(")[0].upper()))
            return await original(self, query, *args, **kwargs)

        return call

    async with node(settings, work) as client:
        assert (await post(client, key="warm")).status_code == 201  # connections, statements
        for name in ("execute", "fetchval"):
            monkeypatch.setattr(asyncpg.connection.Connection, name, counted(name))
        response = await post(client, key="counted")
    assert response.status_code == 201 and response.headers["consistency-token"]
    assert [query for method, query in sent if method == "execute"] == ["BEGIN", "COMMIT"] * 3
    assert [query for method, query in sent if method == "fetchval"] == [
        "SELECT PG_CURRENT_WAL_INSERT_LSN",
        "SELECT PG_ADVISORY_UNLOCK",
    ]
