"""The write audit after a drill: every acknowledged create stored once, nothing else.

Shared by the node-loss experiment (locust's acknowledged creates) and the
lab tests (the closed-loop driver's): both hand it Idempotency-Key -> note id.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx


async def audit(
    base_url: str, acknowledged: dict[str, str], *, prefix: str, page_size: int = 100
) -> dict[str, int]:
    """Jepsen-style check of every acknowledged create against what the service stores.

    lost: acknowledged but absent; duplicated: one key stored as several
    notes; unexpected: a load note whose create was never acknowledged (a
    failed request that did its work anyway, which a client could not know).
    """
    by_title: Counter[str] = Counter()
    ids: set[str] = set()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        cursor: str | None = None
        for _ in range(100_000):  # bounded: at most this many pages
            params: dict[str, Any] = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            page = (await client.get("/v1/notes", params=params)).raise_for_status().json()
            for note in page["items"]:
                if note["title"].startswith(prefix):
                    by_title[note["title"]] += 1
                    ids.add(note["id"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    return {
        "acknowledged": len(acknowledged),
        "lost": sum(1 for note_id in acknowledged.values() if note_id not in ids),
        "duplicated": sum(count - 1 for count in by_title.values() if count > 1),
        "unexpected": sum(1 for title in by_title if title not in acknowledged),
    }
