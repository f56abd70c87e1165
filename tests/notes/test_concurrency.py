"""Races the notes API must win: one ETag, many writers.

(One Idempotency-Key, many requests: tests/idempotency/test_http.py.)
"""

from __future__ import annotations

import asyncio

import httpx

N = 16


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
