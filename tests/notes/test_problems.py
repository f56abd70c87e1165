"""Every problem `type` the API answers, pinned with its status (service/problems.py).

Clients branch on `type`: renaming one is a breaking change, so each URN is
spelled out here in full rather than built with problem_type().
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from service.idempotency import service as idempotency
from service.notes import service as notes

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}


async def _note(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/notes", json={"title": "t"})
    assert response.status_code == 201, response.text
    return f"/v1/notes/{response.json()['id']}"


def _pinned(response: httpx.Response, type_: str, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    document = response.json()
    assert document["type"] == type_
    assert document["status"] == status
    assert document["detail"]
    return document


async def test_validation(client):
    response = await client.post("/v1/notes", json={"title": ""})
    _pinned(response, "urn:cattle:problem:validation", 422)


async def test_malformed_json(client):
    response = await client.post("/v1/notes", content=b"{", headers=JSON)
    _pinned(response, "urn:cattle:problem:malformed-json", 400)


async def test_unsupported_media_type(client):
    response = await client.post("/v1/notes", content=b"{}", headers={"Content-Type": "text/plain"})
    _pinned(response, "urn:cattle:problem:unsupported-media-type", 415)


async def test_invalid_cursor(client):
    response = await client.get("/v1/notes", params={"cursor": "a.b"})
    _pinned(response, "urn:cattle:problem:invalid-cursor", 400)


async def test_invalid_consistency_token(client):
    response = await client.get("/v1/notes", headers={"Consistency-Token": "nope"})
    _pinned(response, "urn:cattle:problem:invalid-consistency-token", 400)


async def test_invalid_entity_tag(client):
    url = await _note(client)
    response = await client.patch(url, json={"title": "x"}, headers={"If-Match": "nope"})
    _pinned(response, "urn:cattle:problem:invalid-entity-tag", 400)


async def test_not_found(client):
    response = await client.get(f"/v1/notes/{uuid.uuid4()}")
    _pinned(response, "urn:cattle:problem:not-found", 404)


async def test_precondition_required(client):
    url = await _note(client)
    response = await client.patch(url, json={"title": "x"})
    _pinned(response, "urn:cattle:problem:precondition-required", 428)


async def test_precondition_failed(client):
    url = await _note(client)
    response = await client.patch(url, json={"title": "x"}, headers={"If-Match": '"9"'})
    _pinned(response, "urn:cattle:problem:precondition-failed", 412)


async def test_idempotency_key_reused(client):
    key = {"Idempotency-Key": "pin-1"}
    assert (await client.post("/v1/notes", json={"title": "a"}, headers=key)).status_code == 201
    response = await client.post("/v1/notes", json={"title": "b"}, headers=key)
    _pinned(response, "urn:cattle:problem:idempotency-key-reused", 422)


async def test_idempotency_key_in_flight(client, monkeypatch):
    async def in_flight(*args, **kwargs):
        raise idempotency.KeyInFlight(retry_after_s=2)

    monkeypatch.setattr(idempotency, "claim", in_flight)
    response = await client.post("/v1/notes", json={"title": "a"}, headers={"Idempotency-Key": "k"})
    _pinned(response, "urn:cattle:problem:idempotency-key-in-flight", 409)
    assert response.headers["retry-after"] == "2"


async def test_database_unavailable(client, monkeypatch):
    async def unreachable(*args, **kwargs):
        raise ConnectionRefusedError("no database")

    monkeypatch.setattr(notes, "list_notes", unreachable)
    response = await client.get("/v1/notes")
    _pinned(response, "urn:cattle:problem:database-unavailable", 503)
    assert response.headers["retry-after"] == "1"
    # A read changed nothing, and its answer says so; a write's cannot.
    assert "nothing was changed" in response.json()["detail"]
    monkeypatch.setattr(notes, "create_note", unreachable)
    response = await client.post("/v1/notes", json={"title": "t"})
    _pinned(response, "urn:cattle:problem:database-unavailable", 503)
    assert "may or may not have been applied" in response.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v2/things", 404), ("PUT", "/v1/notes", 405)],
)
async def test_plain_http_conditions_are_about_blank(client, method, path, status):
    response = await client.request(method, path)
    _pinned(response, "about:blank", status)
