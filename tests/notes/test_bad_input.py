"""Hostile and careless input: each a 4xx problem with a useful detail, on both
backends, never a 500 nor a 503 (a 503 invites retries of a request that can
only fail again)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable

import httpx
import pytest

from service.conditional import MAX_ENTITY_TAGS
from tests import hardening
from tests.conftest import asgi_client
from tests.notes.test_api import assert_problem, create

JSON = {"Content-Type": "application/json"}


async def _url(client) -> str:
    return f"/v1/notes/{(await create(client)).json()['id']}"


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def record(
    client, backend: str, tried: str, answered: tuple[httpx.Response, float], audit: str = "-"
) -> None:
    """One row of the hardening table: the answer, and whether the node is still ready."""
    response, wait_s = answered
    hardening.record(
        "bad input",
        tried,
        answer=hardening.answer_of(
            response.status_code, response.headers.get("content-type"), response.content
        ),
        wait_s=wait_s,
        healthy=(await client.get("/readyz")).status_code == 200,
        audit=audit,
        backend=backend,
    )


# -- conditional headers ----------------------------------------------------------


# Header bytes as a client may send them: latin-1 and UTF-8 digits that are not ASCII.
FOREIGN_DIGITS = [b'"\xb2"', b'"\xb9", "\xb3"', '"٣"'.encode(), '"１"'.encode()]


async def _conditional(client, method: str, url: str, tag):  # type: ignore[no-untyped-def]
    """PATCH or DELETE `url` with `tag` as If-Match, timed."""
    return await timed(
        client.request(
            method,
            url,
            json={"title": "x"} if method == "PATCH" else None,
            headers={"If-Match": tag},
        )
    )


@pytest.mark.parametrize("tag", FOREIGN_DIGITS)
@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
async def test_non_ascii_digits_in_if_match_match_nothing(client, backend, method, tag):
    url = await _url(client)
    answered = await _conditional(client, method, url, tag)
    problem = assert_problem(answered[0], 412, "matches none")
    assert problem["current_etag"] == '"1"'
    assert (await client.get(url)).status_code == 200
    await record(client, backend, f"{method} If-Match: {tag!r}", answered, "note unchanged")


@pytest.mark.parametrize("tag", [b"abc", b'"1', b'"1" "2"', b"1", b'W/ "1"', b'"a"b'])
@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
async def test_garbage_if_match_is_400(client, backend, method, tag):
    url = await _url(client)
    answered = await _conditional(client, method, url, tag)
    assert_problem(answered[0], 400, "If-Match is not a list of entity tags")
    assert (await client.get(url)).json()["version"] == 1
    await record(client, backend, f"{method} If-Match: {tag!r}", answered, "note unchanged")


@pytest.mark.parametrize("tag", [b"abc", b'"1', *FOREIGN_DIGITS])
async def test_if_none_match_garbage_is_400_and_foreign_digits_match_nothing(client, backend, tag):
    url = await _url(client)
    answered = await timed(client.get(url, headers={"If-None-Match": tag}))
    if tag.startswith(b'"') and tag.endswith(b'"'):
        assert answered[0].status_code == 200
    else:
        assert_problem(answered[0], 400, "If-None-Match")
    await record(client, backend, f"GET If-None-Match: {tag!r}", answered)


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
async def test_a_huge_if_match_list_is_refused_with_the_limit(client, backend, method):
    # Enough tags to overflow a query's parameter list if they reached the database.
    url = await _url(client)
    tags = ", ".join(f'"{n}"' for n in range(40_000))
    answered = await timed(
        client.request(
            method,
            url,
            json={"title": "x"} if method == "PATCH" else None,
            headers={"If-Match": tags},
        )
    )
    assert_problem(answered[0], 400, f"more than {MAX_ENTITY_TAGS} entity tags")
    assert (await client.get(url)).json()["version"] == 1
    await record(client, backend, f"{method} If-Match: 40,000 tags", answered, "note unchanged")
    at_limit = ", ".join(f'"{n}"' for n in range(MAX_ENTITY_TAGS, 0, -1))
    response = await client.request(
        method,
        url,
        json={"title": "x"} if method == "PATCH" else None,
        headers={"If-Match": at_limit},
    )
    assert response.status_code in (200, 204), response.text


# -- text ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["title", "body"])
async def test_nul_in_text_is_422_on_both_backends(client, backend, field):
    payload = {"title": "t", field: "a\u0000b"}
    created = await timed(client.post("/v1/notes", json=payload))
    problem = assert_problem(created[0], 422, "NUL")
    assert problem["errors"][0]["pointer"] == f"#/{field}"
    assert (await client.get("/v1/notes")).json()["items"] == []
    await record(client, backend, f"POST a NUL in {field}", created, "no note written")
    url = await _url(client)
    patched = await timed(client.patch(url, json={field: "\u0000"}, headers={"If-Match": '"1"'}))
    assert_problem(patched[0], 422, "NUL")
    assert (await client.get(url)).json()["version"] == 1
    await record(client, backend, f"PATCH a NUL in {field}", patched, "note unchanged")


# -- malformed JSON ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"title": ', "EOF while parsing"),
        (b'{"title": "a"} x', "trailing characters"),
        (b'{"title": "\\x"}', "invalid escape"),
        (b'{"title": "\\ud800"}', "hex escape"),
        (b'{"title": "\\udc00 lone"}', "surrogate"),
        (b"[" * 5_000 + b"]" * 5_000, "recursion limit"),
        (b'{"title": ' + b"1" * 5_000 + b"}", "number out of range"),
        (b'{"title": NaN}', "expected value"),
        ('{"title": "é"}'.encode("latin-1"), "invalid unicode code point"),
        ('{"title": "a"}'.encode("utf-16-le"), "line 1 column"),
        (b'{"title": "a\x01"}', "control character"),
        (b"", "the body is empty"),
    ],
    ids=[
        "truncated",
        "trailing",
        "escape",
        "surrogate-high",
        "surrogate-low",
        "deep",
        "huge-int",
        "nan",
        "latin-1",
        "utf-16",
        "control",
        "empty",
    ],
)
async def test_malformed_json_is_400_with_the_parsers_reason(client, backend, body, reason):
    for method, url, headers in [
        ("POST", "/v1/notes", JSON),
        ("PATCH", await _url(client), {**JSON, "If-Match": '"1"'}),
    ]:
        answered = await timed(client.request(method, url, content=body, headers=headers))
        problem = assert_problem(answered[0], 400, reason)
        assert problem["type"] == "urn:cattle:problem:malformed-json"
        assert "error parsing the body" not in problem["detail"]
        assert " at at " not in problem["detail"]
        await record(client, backend, f"{method} malformed JSON: {reason}", answered)
    # Nothing but the one note made to PATCH exists, unchanged.
    (note,) = (await client.get("/v1/notes")).json()["items"]
    assert note["version"] == 1


# -- headers, cursors, limits --------------------------------------------------------


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "ключ"])
async def test_bad_idempotency_key_is_422_naming_the_header(client, backend, key):
    answered = await timed(
        client.post("/v1/notes", json={"title": "t"}, headers={"Idempotency-Key": key.encode()})
    )
    problem = assert_problem(answered[0], 422, "Idempotency-Key")
    assert problem["errors"][0]["location"] == "header"
    assert (await client.get("/v1/notes")).json()["items"] == []
    shown = repr(key) if len(key) < 20 else f"{len(key)} characters"
    await record(client, backend, f"POST Idempotency-Key: {shown}", answered, "no note written")


@pytest.mark.parametrize("token", ["", "w1.", "w1.XYZ", "w2.10", "w1." + "f" * 17, b"w1.\xb2"])
async def test_bad_consistency_token_is_400(client, backend, token):
    headers = {"Consistency-Token": token}
    listed = await timed(client.get("/v1/notes", headers=headers))
    assert_problem(listed[0], 400, "Consistency-Token")
    await record(client, backend, f"GET /v1/notes Consistency-Token: {token!r}", listed)
    url = await _url(client)
    read = await timed(client.get(url, headers=headers))
    assert_problem(read[0], 400, "Consistency-Token")
    await record(client, backend, f"GET a note Consistency-Token: {token!r}", read)


@pytest.mark.parametrize("limit", ["0", "-1", "x", "1.5", "", "1e3", "²"])
async def test_bad_limit_is_422_naming_it(client, backend, limit):
    answered = await timed(client.get("/v1/notes", params={"limit": limit}))
    assert_problem(answered[0], 422, "limit")
    await record(client, backend, f"GET /v1/notes?limit={limit}", answered)


@pytest.mark.parametrize("cursor", ["", ".", "a" * 600, "².²", "\u0000"])
async def test_odd_cursors_are_400(client, backend, cursor):
    answered = await timed(client.get("/v1/notes", params={"cursor": cursor}))
    assert_problem(answered[0], 400, "cursor")
    shown = repr(cursor) if len(cursor) < 20 else f"{len(cursor)} characters"
    await record(client, backend, f"GET /v1/notes cursor {shown}", answered)


async def test_the_page_size_cap_holds(settings):
    capped = settings.model_copy(update={"page_limit_max": 3, "page_limit_default": 2})
    async with asgi_client(capped) as client:
        for i in range(5):
            await create(client, f"n{i}")
        for limit in ("3", "4", "100", str(10**30)):
            page = (await client.get("/v1/notes", params={"limit": limit})).json()
            assert len(page["items"]) == 3 and page["next_cursor"], limit
        assert len((await client.get("/v1/notes")).json()["items"]) == 2
        assert len((await client.get("/v1/notes", params={"limit": 1})).json()["items"]) == 1


# -- methods and paths -----------------------------------------------------------------


async def test_head_works_wherever_get_does(client):
    url = await _url(client)
    for path in (url, "/v1/notes", "/metrics", "/livez"):
        got, head = await client.get(path), await client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.headers["content-type"] == got.headers["content-type"]
    assert (await client.head(url)).headers["etag"] == '"1"'
    assert (await client.head(f"/v1/notes/{uuid.uuid4()}")).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/notes/{id}", "DELETE, GET, HEAD, PATCH"),
        ("POST", "/v1/notes/{id}", "DELETE, GET, HEAD, PATCH"),
        ("DELETE", "/v1/notes", "GET, HEAD, POST"),
        ("PUT", "/metrics", "GET, HEAD"),
    ],
)
async def test_405_allow_lists_every_method_of_the_path(client, backend, method, path, allowed):
    url = path.replace("{id}", str(uuid.uuid4()))
    answered = await timed(client.request(method, url))
    assert_problem(answered[0], 405, allowed)
    assert answered[0].headers["allow"] == allowed
    await record(client, backend, f"{method} {path}", answered)


@pytest.mark.parametrize("path", ["/v1/notes/", "/metrics/", "/livez/"])
async def test_no_redirect_built_from_the_host_header(client, backend, path):
    answered = await timed(client.get(path, headers={"Host": "evil.example"}))
    assert "location" not in answered[0].headers
    assert_problem(answered[0], 404, "no resource")
    await record(client, backend, f"GET {path} with Host: evil.example", answered)
