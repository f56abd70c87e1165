"""A small closed-loop load driver with a full request log.

Locust drives the experiments (see loadtests/clients/notes.py); this driver
is for tests and fault drills that need every request's outcome at hand:
which node served it, when, and which note each acknowledged create produced
(for loadtests.experiments.audit). It never retries: whatever fails here
failed for a real client too.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Outcome:
    kind: str  # "get" or "post"
    started: float  # monotonic seconds
    ended: float
    status: int | None  # None: no HTTP answer (connection error, timeout)
    node: str | None
    error: str | None = None
    key: str | None = None  # Idempotency-Key of a create
    note_id: str | None = None  # id a create acknowledged

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


@dataclass
class Run:
    # Titles of this run's creates start with it, so an audit sees only them.
    prefix: str = field(default_factory=lambda: f"load-{uuid.uuid4().hex[:8]}-")
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def failures(self, kind: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and (kind is None or o.kind == kind)]

    def served_by(self) -> Counter[str]:
        return Counter(o.node for o in self.outcomes if o.ok and o.node)

    def acknowledged(self) -> dict[str, str]:
        """Idempotency-Key -> note id for every create answered 201."""
        return {o.key: o.note_id for o in self.outcomes if o.status == 201 and o.key and o.note_id}

    def summary(self) -> dict[str, Any]:
        failures = self.failures()
        return {
            "requests": len(self.outcomes),
            "failed": len(failures),
            "failed_get": len(self.failures("get")),
            "failed_post": len(self.failures("post")),
            "served_by": dict(self.served_by()),
            "failure_samples": [
                {"kind": f.kind, "status": f.status, "error": f.error} for f in failures[:5]
            ],
        }


async def drive(
    base_url: str,
    *,
    duration_s: float,
    concurrency: int = 8,
    post_ratio: float = 0.2,
    seed_notes: int = 20,
    max_requests: int = 200_000,
    timeout_s: float = 10.0,
    think_s: float = 0.0,
) -> Run:
    """Run `concurrency` closed-loop clients for `duration_s` (bounded by `max_requests`).

    Reads GET a random known note; creates POST with a fresh Idempotency-Key
    whose title is the key itself, so the audit can find duplicates by title.
    """
    run = Run()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        known: list[str] = []
        for i in range(seed_notes):
            response = await client.post("/v1/notes", json={"title": f"seed-{i}"})
            response.raise_for_status()
            known.append(response.json()["id"])
        budget = itertools.count()
        rng = random.Random(7)
        run.started = time.monotonic()
        deadline = run.started + duration_s

        async def client_loop() -> None:
            while time.monotonic() < deadline and next(budget) < max_requests:
                if rng.random() < post_ratio:
                    outcome = await _create(client, run.prefix)
                    if outcome.note_id:
                        known.append(outcome.note_id)
                else:
                    outcome = await _read(client, rng.choice(known))
                run.outcomes.append(outcome)
                if think_s:
                    await asyncio.sleep(think_s)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        run.ended = time.monotonic()
    return run


async def _read(client: httpx.AsyncClient, note_id: str) -> Outcome:
    started = time.monotonic()
    try:
        response = await client.get(f"/v1/notes/{note_id}")
    except httpx.HTTPError as exc:
        return Outcome("get", started, time.monotonic(), None, None, f"{type(exc).__name__}: {exc}")
    return Outcome(
        "get", started, time.monotonic(), response.status_code, response.headers.get("x-served-by")
    )


async def _create(client: httpx.AsyncClient, prefix: str) -> Outcome:
    key = f"{prefix}{uuid.uuid4().hex}"
    started = time.monotonic()
    try:
        response = await client.post(
            "/v1/notes", json={"title": key}, headers={"Idempotency-Key": key}
        )
    except httpx.HTTPError as exc:
        return Outcome(
            "post", started, time.monotonic(), None, None, f"{type(exc).__name__}: {exc}", key=key
        )
    note_id = response.json().get("id") if response.status_code == 201 else None
    return Outcome(
        "post",
        started,
        time.monotonic(),
        response.status_code,
        response.headers.get("x-served-by"),
        key=key,
        note_id=note_id,
    )
