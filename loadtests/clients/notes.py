"""Locust users for cattle: readers, writers and listers, mixable by weight.

Usable as a plain locustfile (`locust -f loadtests/clients/notes.py --host URL`)
and as a library (loadtests/harness/locust_run.py). Every request is attributed to
the node that served it (X-Served-By) by the Recorder, which also keeps the
id of every acknowledged create for the audit after a run.

Clients here never retry: a failure is what a real client would have seen.
They speak HTTP only and never import service/: they load the service as a
client elsewhere would. A fork with another domain replaces this module with
one offering the same four names the harness uses: MIXES, POOL, RECORDER and
seed().
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from locust import FastHttpUser, events, task
from locust.env import Environment


@dataclass
class NotePool:
    """Notes known to the load: (id, the consistency token of their last write)."""

    notes: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cap: int = 5000

    def add(self, note_id: str, token: str | None) -> None:
        with self.lock:
            if len(self.notes) >= self.cap:
                self.notes[random.randrange(self.cap)] = (note_id, token)
            else:
                self.notes.append((note_id, token))

    def pick(self) -> tuple[str, str | None] | None:
        with self.lock:
            return random.choice(self.notes) if self.notes else None


POOL = NotePool()


def seed(host: str, count: int) -> None:
    """Create `count` notes before the load starts, so readers have something to read."""
    for i in range(count):
        request = urllib.request.Request(  # noqa: S310 (the lab's loopback front)
            f"{host}/v1/notes",
            data=json.dumps({"title": f"seed-{i}", "body": "seed"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            POOL.add(json.load(response)["id"], response.headers.get("consistency-token"))


@dataclass
class Recorder:
    """One row per request: when, what, which node, outcome, latency, write id."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    prefix: str = field(default_factory=lambda: f"load-{uuid.uuid4().hex[:8]}-")

    COLUMNS = ("t", "name", "status", "node", "latency_ms", "ok", "key", "note_id", "error")

    def on_request(
        self,
        request_type: str,
        name: str,
        response_time: float,
        response: Any,
        exception: BaseException | None,
        context: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        status = getattr(response, "status_code", None) or None
        headers = getattr(response, "headers", None) or {}
        context = context or {}
        note_id = None
        if name == "create" and status == 201:
            # Locust hands listeners a copy of the request's context, so the
            # id comes from the response itself.
            try:
                note_id = response.json()["id"]
            except (ValueError, KeyError, TypeError):
                note_id = None
        self.rows.append(
            (
                round(time.time() - response_time / 1000, 4),
                name,
                status,
                headers.get("x-served-by"),
                round(response_time, 2),
                exception is None,
                context.get("key"),
                note_id,
                None if exception is None else f"{type(exception).__name__}: {exception}"[:200],
            )
        )


RECORDER = Recorder()


def _attach_recorder(environment: Environment, **_: Any) -> None:
    environment.events.request.add_listener(RECORDER.on_request)  # type: ignore[no-untyped-call]


events.init.add_listener(_attach_recorder)  # type: ignore[no-untyped-call]


class CattleUser(FastHttpUser):
    abstract = True
    # Closed loop, no think time: the experiments size load by user count.
    connection_timeout = 5.0
    network_timeout = 10.0

    def on_start(self) -> None:
        self.mine: list[tuple[str, str]] = []  # (id, etag) of notes this user wrote

    def read_note(self) -> None:
        """One note others wrote, sending back its consistency token."""
        picked = POOL.pick()
        if picked is None:
            return
        note_id, token = picked
        headers = {"Consistency-Token": token} if token else {}
        self.client.get(f"/v1/notes/{note_id}", headers=headers, name="read")

    def create_note(self) -> None:
        """A new note under an Idempotency-Key."""
        key = f"{RECORDER.prefix}{uuid.uuid4().hex}"
        context: dict[str, Any] = {"key": key}
        with self.client.post(
            "/v1/notes",
            json={"title": key, "body": "written under load"},
            headers={"Idempotency-Key": key},
            name="create",
            context=context,
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"create answered {response.status_code}")
                return
            note_id = response.json()["id"]
            POOL.add(note_id, response.headers.get("consistency-token"))
            self.mine.append((note_id, response.headers.get("etag", '"1"')))
            del self.mine[:-50]

    def update_note(self) -> None:
        """An edit of a note this user wrote, with If-Match (none yet: no request)."""
        if not self.mine:
            return
        index = random.randrange(len(self.mine))
        note_id, etag = self.mine[index]
        with self.client.patch(
            f"/v1/notes/{note_id}",
            json={"body": f"edited at {time.time():.3f}"},
            headers={"If-Match": etag},
            name="update",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"update answered {response.status_code}")
                return
            self.mine[index] = (note_id, response.headers.get("etag", etag))
            POOL.add(note_id, response.headers.get("consistency-token"))

    def list_page(self, cursor: str | None) -> str | None:
        """A page of the listing from `cursor`; the next page's cursor, or None at the end."""
        path = "/v1/notes?limit=20" + (f"&cursor={cursor}" if cursor else "")
        with self.client.get(path, name="list", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"list answered {response.status_code}")
                return None
            next_cursor: str | None = response.json().get("next_cursor")
            return next_cursor


class ReaderUser(CattleUser):
    """Reads notes others wrote, sending back their consistency tokens."""

    weight = 90

    @task
    def read(self) -> None:
        self.read_note()


class WriterUser(CattleUser):
    """Creates notes with an Idempotency-Key, then edits them with If-Match."""

    weight = 5

    @task(3)
    def create(self) -> None:
        self.create_note()

    @task(1)
    def update(self) -> None:
        self.update_note()


class ListerUser(CattleUser):
    """Pages through the notes, following the cursor a few pages deep."""

    weight = 5

    @task
    def list_pages(self) -> None:
        cursor = None
        for _ in range(random.randint(1, 3)):
            cursor = self.list_page(cursor)
            if not cursor:
                return


class MixedUser(CattleUser):
    """Every kind of request from each user, in a fixed cycle of 20: 18 reads,
    one page of the listing (the next page each time round), one write (three
    creates for every update). Any few seconds of requests then hold the mix's
    proportions, whatever each kind's latency: with a user per kind, a kind
    whose requests wait longer sends fewer of them, and drawn at random, a few
    hundred requests hold a few lists more or less; either moves the work per
    request (a list costs more than a read)."""

    CYCLE = ("read",) * 18 + ("list", "write")
    WRITES = ("create", "create", "create", "update")

    def on_start(self) -> None:
        super().on_start()
        # Users start at different points of the cycle, so they do not write together.
        self.step = random.randrange(len(self.CYCLE))
        self.writes = random.randrange(len(self.WRITES))
        self.cursor: str | None = None

    @task
    def next_request(self) -> None:
        kind = self.CYCLE[self.step % len(self.CYCLE)]
        self.step += 1
        if kind == "read":
            self.read_note()
        elif kind == "list":
            self.cursor = self.list_page(self.cursor)
        elif self.WRITES[self.writes % len(self.WRITES)] == "create":
            self.writes += 1
            self.create_note()
        else:
            self.writes += 1
            self.update_note()


MIXES: dict[str, dict[type[CattleUser], int]] = {
    "read-mostly": {ReaderUser: 90, WriterUser: 5, ListerUser: 5},
    "read-mostly-cycle": {MixedUser: 1},
    "read-only": {ReaderUser: 1},
    "write-heavy": {ReaderUser: 50, WriterUser: 40, ListerUser: 10},
}
