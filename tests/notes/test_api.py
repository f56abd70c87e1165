"""The notes API over ASGI, on SQLite and on a real PostgreSQL (DESIGN.md section 3)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

PROBLEM = "application/problem+json"


async def create(client: httpx.AsyncClient, title: str = "t", body: str = "b", **headers: str):
    return await client.post("/v1/notes", json={"title": title, "body": body}, headers=headers)


def assert_problem(
    response: httpx.Response, status: int, detail_contains: str = ""
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert problem["title"]
    assert problem["type"]
    assert detail_contains.lower() in problem["detail"].lower()
    assert "Traceback" not in response.text
    return problem


# -- create -------------------------------------------------------------------


async def test_create_returns_201_location_etag_and_server_owned_fields(client):
    response = await create(client, "Groceries", "milk, eggs")
    assert response.status_code == 201
    note = response.json()
    assert set(note) == {"id", "title", "body", "version", "created_at", "updated_at"}
    assert note["title"] == "Groceries" and note["body"] == "milk, eggs"
    assert note["version"] == 1
    assert uuid.UUID(note["id"])
    assert note["created_at"].endswith("Z") and note["created_at"] == note["updated_at"]
    assert response.headers["location"] == f"/v1/notes/{note['id']}"
    assert response.headers["etag"] == '"1"'
    followed = await client.get(response.headers["location"])
    assert followed.json() == note


async def test_body_defaults_to_empty(client):
    response = await client.post("/v1/notes", json={"title": "only a title"})
    assert response.status_code == 201
    assert response.json()["body"] == ""


async def test_every_response_names_the_node(client):
    ok = await create(client)
    missing = await client.get(f"/v1/notes/{uuid.uuid4()}")
    invalid = await client.post("/v1/notes", json={})
    for response in (ok, missing, invalid):
        assert response.headers["x-served-by"] == "test-node"


# -- idempotent create -------------------------------------------------------------


async def test_same_key_same_body_replays_the_first_note(client):
    first = await create(client, "a", "b", **{"Idempotency-Key": "k-1"})
    again = await create(client, "a", "b", **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["etag"] == first.headers["etag"]
    assert again.headers["idempotent-replayed"] == "true"
    listing = (await client.get("/v1/notes")).json()
    assert [n["id"] for n in listing["items"]] == [first.json()["id"]]


# The mechanism itself (422, 409, takeovers, expiry, races) is tested in
# tests/idempotency/ against a route of its own; here, what notes make of it.


# -- read -----------------------------------------------------------------------


async def test_get_returns_etag_and_304_on_if_none_match(client):
    note = (await create(client)).json()
    url = f"/v1/notes/{note['id']}"
    response = await client.get(url)
    assert response.status_code == 200 and response.headers["etag"] == '"1"'
    not_modified = await client.get(url, headers={"If-None-Match": '"1"'})
    assert not_modified.status_code == 304 and not not_modified.content
    assert not_modified.headers["etag"] == '"1"'
    assert (await client.get(url, headers={"If-None-Match": 'W/"1"'})).status_code == 304
    assert (await client.get(url, headers={"If-None-Match": "*"})).status_code == 304
    stale = await client.get(url, headers={"If-None-Match": '"0", "7"'})
    assert stale.status_code == 200


async def test_get_unknown_is_404_problem(client):
    response = await client.get(f"/v1/notes/{uuid.uuid4()}")
    assert_problem(response, 404, "does not exist")


async def test_get_bad_id_is_422_problem(client):
    response = await client.get("/v1/notes/not-a-uuid")
    problem = assert_problem(response, 422, "note_id")
    assert problem["errors"][0]["location"] == "path"


# -- list -----------------------------------------------------------------------


async def test_keyset_pages_cover_everything_once_in_creation_order(client):
    created = [(await create(client, f"n{i}")).json()["id"] for i in range(7)]
    seen, cursor, pages = [], None, 0
    while pages < 10:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/notes", params=params)).json()
        assert set(page) == {"items", "next_cursor"}
        seen += [n["id"] for n in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created
    assert pages == 3


async def test_pages_are_stable_under_concurrent_inserts(client):
    first = [(await create(client, f"n{i}")).json()["id"] for i in range(4)]
    page1 = (await client.get("/v1/notes", params={"limit": 2})).json()
    newer = (await create(client, "later")).json()["id"]
    page2 = (
        await client.get("/v1/notes", params={"limit": 10, "cursor": page1["next_cursor"]})
    ).json()
    assert [n["id"] for n in page1["items"]] + [n["id"] for n in page2["items"]] == first + [newer]


async def test_limit_is_capped_and_validated(client, settings):
    for i in range(3):
        await create(client, f"n{i}")
    assert len((await client.get("/v1/notes", params={"limit": 10_000})).json()["items"]) == 3
    assert_problem(await client.get("/v1/notes", params={"limit": 0}), 422, "limit")
    assert_problem(await client.get("/v1/notes", params={"limit": "x"}), 422, "limit")


@pytest.mark.parametrize("kind", ["garbage", "tampered", "foreign", "no-after"])
async def test_bad_cursor_is_400(client, kind):
    from service.pagination import CursorCodec

    for i in range(3):
        await create(client, f"n{i}")
    good = (await client.get("/v1/notes", params={"limit": 1})).json()["next_cursor"]
    data, sig = good.split(".")
    cursor = {
        "garbage": "%%%not-a-cursor",
        "tampered": data[:-2] + ("AA" if not data.endswith("AA") else "BB") + "." + sig,
        "foreign": CursorCodec(b"another-secret", purpose="notes").encode(
            {"after": str(uuid.uuid4())}
        ),
        "no-after": CursorCodec(b"test-cursor-secret-0123456789", purpose="notes").encode({"x": 1}),
    }[kind]
    assert_problem(await client.get("/v1/notes", params={"cursor": cursor}), 400, "cursor")


# -- update ---------------------------------------------------------------------


async def test_patch_requires_if_match(client):
    note = (await create(client)).json()
    response = await client.patch(f"/v1/notes/{note['id']}", json={"title": "x"})
    assert_problem(response, 428, "If-Match")


async def test_patch_with_matching_etag_bumps_version(client):
    note = (await create(client, "old", "body")).json()
    response = await client.patch(
        f"/v1/notes/{note['id']}", json={"title": "new"}, headers={"If-Match": '"1"'}
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["title"] == "new" and updated["body"] == "body"
    assert updated["version"] == 2 and response.headers["etag"] == '"2"'
    assert (
        updated["updated_at"] > note["updated_at"] and updated["created_at"] == note["created_at"]
    )


async def test_patch_accepts_merge_patch_media_type(client):
    note = (await create(client)).json()
    response = await client.patch(
        f"/v1/notes/{note['id']}",
        content=b'{"body": "merged"}',
        headers={"If-Match": "*", "Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200 and response.json()["body"] == "merged"


@pytest.mark.parametrize("if_match", ['"2"', 'W/"1"', '"abc"', '"01"', ""])
async def test_patch_with_stale_or_weak_etag_is_412(client, if_match):
    note = (await create(client)).json()
    response = await client.patch(
        f"/v1/notes/{note['id']}", json={"title": "x"}, headers={"If-Match": if_match}
    )
    problem = assert_problem(response, 412, "changed")
    assert problem["current_etag"] == '"1"'
    assert (await client.get(f"/v1/notes/{note['id']}")).json()["title"] == "t"


async def test_patch_unknown_is_404(client):
    response = await client.patch(
        f"/v1/notes/{uuid.uuid4()}", json={"title": "x"}, headers={"If-Match": '"1"'}
    )
    assert_problem(response, 404)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "at least one"),
        ({"title": None}, "null"),
        ({"id": "x"}, "extra"),
        ({"version": 9}, "extra"),
    ],
)
async def test_patch_rejects_empty_null_and_server_fields(client, payload, fragment):
    note = (await create(client)).json()
    response = await client.patch(
        f"/v1/notes/{note['id']}", json=payload, headers={"If-Match": '"1"'}
    )
    assert_problem(response, 422, fragment)


# -- delete ---------------------------------------------------------------------


async def test_delete_then_repeat_is_404(client):
    note = (await create(client)).json()
    url = f"/v1/notes/{note['id']}"
    deleted = await client.delete(url)
    assert deleted.status_code == 204 and not deleted.content
    assert_problem(await client.delete(url), 404)
    assert_problem(await client.get(url), 404)


async def test_delete_honours_if_match(client):
    note = (await create(client)).json()
    url = f"/v1/notes/{note['id']}"
    assert_problem(await client.delete(url, headers={"If-Match": '"5"'}), 412)
    assert (await client.get(url)).status_code == 200
    assert (await client.delete(url, headers={"If-Match": '"1"'})).status_code == 204


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "pointer"),
    [
        ({"title": ""}, "#/title"),
        ({"title": "x" * 201}, "#/title"),
        ({"title": "ok", "body": "x" * 10_001}, "#/body"),
        ({"title": "ok", "version": 3}, "#/version"),
        ({"title": "ok", "id": "mine"}, "#/id"),
        ({"body": "no title"}, "#/title"),
        ({"title": 5}, "#/title"),
    ],
)
async def test_invalid_create_is_422_with_pointer(client, payload, pointer):
    response = await client.post("/v1/notes", json=payload)
    problem = assert_problem(response, 422)
    assert pointer in [e.get("pointer") for e in problem["errors"]]
    assert pointer in problem["detail"]


async def test_title_limits_count_characters_not_bytes(client):
    response = await create(client, "é" * 200, "ü" * 10_000)
    assert response.status_code == 201


async def test_malformed_json_is_400(client):
    response = await client.post(
        "/v1/notes", content=b'{"title": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400, "not valid JSON")


async def test_json_that_is_not_an_object_is_422(client):
    response = await client.post("/v1/notes", json=["title"])
    assert_problem(response, 422)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_wrong_content_type_is_415(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post("/v1/notes", content=b'{"title": "x"}', headers=headers)
    assert_problem(response, 415, "application/json")


async def test_body_over_limit_is_413(client, settings):
    big = {"title": "x", "body": "y" * (settings.max_body_bytes + 1)}
    response = await client.post("/v1/notes", json=big)
    assert_problem(response, 413, "CATTLE_MAX_BODY_BYTES")
    assert (await client.get("/v1/notes")).json()["items"] == []


async def test_streamed_body_over_limit_is_413(client, settings):
    # No Content-Length: the limit must hold while the body is being read.
    chunk = b"y" * 4096

    async def body():
        yield b'{"title": "x", "body": "'
        for _ in range(settings.max_body_bytes // len(chunk) + 2):
            yield chunk
        yield b'"}'

    response = await client.post(
        "/v1/notes", content=body(), headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413)


async def test_unknown_route_and_method_are_problems(client):
    assert_problem(await client.get("/v2/things"), 404)
    assert_problem(await client.put("/v1/notes", json={}), 405, "use GET, HEAD, POST")


async def test_unexpected_error_is_500_problem_without_trace(client, monkeypatch):
    from service.notes import service

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service, "list_notes", broken)
    response = await client.get("/v1/notes")
    assert_problem(response, 500)
    assert "secret internals" not in response.text
    assert response.headers["x-served-by"] == "test-node"


async def test_openapi_and_docs_are_served(client):
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/notes" in schema["paths"] and "/v1/notes/{note_id}" in schema["paths"]
    assert (await client.get("/docs")).status_code == 200


async def test_the_hot_read_documents_the_headers_it_reads_by_hand(client):
    # GET /v1/notes/{id} takes its headers from the request, not as FastAPI
    # parameters; its OpenAPI operation still declares both, with their shape.
    schema = (await client.get("/openapi.json")).json()
    parameters = schema["paths"]["/v1/notes/{note_id}"]["get"]["parameters"]
    headers = {p["name"].lower(): p for p in parameters if p["in"] == "header"}
    assert set(headers) == {"if-none-match", "consistency-token"}
    for header in headers.values():
        assert header["required"] is False
        assert header["schema"]["type"] == "string" and header["schema"]["pattern"]
        assert header["description"]
