"""Races the API must win: one key, many requests; one ETag, many writers."""

from __future__ import annotations

import asyncio

import httpx

from service.db.engines import Database

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


async def test_concurrent_posts_with_one_key_create_exactly_one_note(client, settings, monkeypatch):
    from service.notes import service

    create_note = service.create_note

    async def slow_create_note(*args, **kwargs):
        # Hold the work open so the other requests arrive while it is in flight.
        await asyncio.sleep(0.2)
        return await create_note(*args, **kwargs)

    monkeypatch.setattr(service, "create_note", slow_create_note)

    async def attempt() -> httpx.Response:
        return await client.post(
            "/v1/notes", json={"title": "once", "body": "only"}, headers={"Idempotency-Key": "race"}
        )

    responses = await asyncio.gather(*(attempt() for _ in range(N)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, statuses
    created_ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(created_ids) == 1
    # One did the work; the others saw it in flight (409), or, arriving after
    # it finished, got its response replayed.
    fresh = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(fresh) == 1, statuses
    assert 409 in statuses, statuses
    assert await _count_notes(settings) == 1
    # Once the winner finished, every retry gets its response.
    replay = await attempt()
    assert replay.status_code == 201 and replay.json()["id"] in created_ids


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
