"""Races the API must win: one key, many requests; one ETag, many writers."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.db.engines import Database
from tests.conftest import asgi_client

N = 16


async def _count_notes(settings) -> int:
    from sqlalchemy import func, select

    from service.notes.models import Note

    database = Database(settings)
    try:
        async with database.read() as session:
            return int(await session.scalar(select(func.count()).select_from(Note)) or 0)
    finally:
        await database.dispose()


@pytest.fixture
def slow_create(monkeypatch):
    """Hold each create open for a while, so others arrive while it is in flight."""
    from service.notes import service

    create_note = service.create_note

    async def slow_create_note(*args, **kwargs):
        await asyncio.sleep(0.3)
        return await create_note(*args, **kwargs)

    monkeypatch.setattr(service, "create_note", slow_create_note)


async def _race(client: httpx.AsyncClient, key: str | None = "race") -> list[httpx.Response]:
    headers = {"Idempotency-Key": key} if key is not None else {}

    async def attempt() -> httpx.Response:
        return await client.post(
            "/v1/notes", json={"title": "once", "body": "only"}, headers=headers
        )

    return await asyncio.gather(*(attempt() for _ in range(N)))


def _fresh(responses: list[httpx.Response]) -> list[httpx.Response]:
    return [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]


async def test_concurrent_posts_with_one_key_create_exactly_one_note(settings, slow_create):
    # Waiting less than the work takes: the others are told it is in flight.
    async with asgi_client(settings.model_copy(update={"idempotency_wait_s": 0.05})) as client:
        responses = await _race(client)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {201, 409}, statuses
        assert 409 in statuses, statuses
        assert len(_fresh(responses)) == 1, statuses
        assert len({r.json()["id"] for r in responses if r.status_code == 201}) == 1
        assert await _count_notes(settings) == 1
        # Once the winner finished, every retry gets its response.
        replay = (await _race(client))[0]
        assert replay.status_code == 201
        assert replay.json()["id"] == _fresh(responses)[0].json()["id"]


async def test_the_same_race_without_a_key_creates_a_note_per_request(client, settings):
    """The unprotected case: the key is what makes the races above create one note."""
    responses = await _race(client, key=None)
    assert [r.status_code for r in responses] == [201] * N
    assert len({r.json()["id"] for r in responses}) == N
    assert await _count_notes(settings) == N


async def test_requests_that_wait_for_an_in_flight_key_get_its_response(
    client, settings, slow_create
):
    responses = await _race(client)
    statuses = [r.status_code for r in responses]
    assert len(_fresh(responses)) == 1
    assert len({r.json()["id"] for r in responses if r.status_code == 201}) == 1
    assert await _count_notes(settings) == 1
    if settings.is_sqlite:
        # No lock to wait on: a key in flight is 409 at once.
        assert 409 in statuses, statuses
    else:
        # They waited on the key's lock (CATTLE_IDEMPOTENCY_WAIT_S) and replayed.
        assert statuses == [201] * N, statuses


async def test_concurrent_patches_with_one_etag_one_wins(client, settings):
    note = (await client.post("/v1/notes", json={"title": "start"})).json()

    async def attempt(i: int) -> httpx.Response:
        return await client.patch(
            f"/v1/notes/{note['id']}", json={"title": f"writer {i}"}, headers={"If-Match": '"1"'}
        )

    responses = await asyncio.gather(*(attempt(i) for i in range(N)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 1, statuses
    assert statuses.count(412) == N - 1, statuses
    winner = next(r for r in responses if r.status_code == 200).json()
    current = (await client.get(f"/v1/notes/{note['id']}")).json()
    assert current == winner and current["version"] == 2
