"""Baseline apps for the efficiency benchmark: cattle's read route with nothing behind it.

Each serves GET /v1/notes/{id} with the same JSON body as cattle's
(`id, title, body, version, created_at, updated_at`) from an in-memory dict,
and 404 for an unknown id; no database, no middleware, no telemetry, no ETag.
They show what the framework layers below cattle cost on their own:

    fastapi_app    bare FastAPI, in-memory: a pydantic response model validates
                   and serializes the stored fields, as cattle's NoteOut does
    starlette_app  bare Starlette: a route, JSONResponse from the stored dict
    raw_asgi_app   a hand-written ASGI callable sending pre-encoded JSON bytes

Run one as the benchmark does: `python -m uvicorn loadtests.benchmarks.baselines:raw_asgi_app`.
The note they serve is BENCH_NOTE_JSON (the benchmark passes the note it read
from cattle) or, without it, a fixed example.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

NOTE_ENV = "BENCH_NOTE_JSON"
NOTES_PREFIX = "/v1/notes/"
EXAMPLE_NOTE = {
    "id": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "title": "bench",
    "body": "x" * 200,
    "version": 1,
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
}


def _load_notes() -> dict[str, dict[str, Any]]:
    """The stored notes by id, as JSON-ready dicts (what a row would give)."""
    raw = os.environ.get(NOTE_ENV)
    note = json.loads(raw) if raw else EXAMPLE_NOTE
    return {str(note["id"]): note}


NOTES = _load_notes()


# bare FastAPI, in-memory


class NoteOut(BaseModel):
    """The shape of cattle's NoteOut, declared here so the baseline owes cattle nothing."""

    id: uuid.UUID
    title: str
    body: str
    version: int
    created_at: datetime
    updated_at: datetime


fastapi_app = FastAPI(title="bare FastAPI, in-memory")


@fastapi_app.get("/v1/notes/{note_id}", response_model=NoteOut)
async def get_note(note_id: uuid.UUID) -> dict[str, Any]:
    note = NOTES.get(str(note_id))
    if note is None:
        raise HTTPException(404, f"note {note_id} does not exist")
    return note


# bare Starlette


async def starlette_get_note(request: Request) -> JSONResponse:
    note = NOTES.get(str(request.path_params["note_id"]))
    if note is None:
        return JSONResponse({"detail": "not found"}, status_code=404)
    return JSONResponse(note)


starlette_app = Starlette(routes=[Route("/v1/notes/{note_id:uuid}", starlette_get_note)])


# raw ASGI

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ENCODED = {
    note_id: json.dumps(note, separators=(",", ":")).encode() for note_id, note in NOTES.items()
}
_NOT_FOUND = b'{"detail":"not found"}'


async def raw_asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    body = None
    if scope["method"] == "GET" and path.startswith(NOTES_PREFIX):
        body = _ENCODED.get(path[len(NOTES_PREFIX) :])
    status = 200 if body is not None else 404
    body = body if body is not None else _NOT_FOUND
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


APPS = {
    "fastapi": "loadtests.benchmarks.baselines:fastapi_app",
    "starlette": "loadtests.benchmarks.baselines:starlette_app",
    "raw-asgi": "loadtests.benchmarks.baselines:raw_asgi_app",
}
