"""HTTP routes for notes: conditional requests, idempotent creates, keyset pages."""

from __future__ import annotations

import functools
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from service import conditional
from service.cache import http as cache
from service.db import consistency
from service.db.engines import consistency_token
from service.deps import (
    DatabaseDep,
    JSONRoute,
    MinLsnDep,
    SettingsDep,
    header_parameter,
    require_json,
)
from service.idempotency import http as idempotency
from service.notes import service
from service.notes.models import Note
from service.notes.schemas import NoteCreate, NoteOut, NotePage, NotePatch
from service.pagination import CursorCodec, InvalidCursor
from service.problems import Problem, problem_responses

# JSONRoute: bodies are parsed strictly, and a parse error says what and where.
router = APIRouter(prefix="/v1/notes", tags=["notes"], route_class=JSONRoute)

JSON = "application/json"


def _header(description: str, *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"}}


# What the responses carry, for the OpenAPI description (and schemathesis).
_ETAG = {"ETag": _header('The note\'s version as a strong ETag ("3")', required=True)}
_TOKEN = {
    consistency.HEADER: {
        **_header(
            "Send back on a read to see this write (absent when the backend has no WAL position)"
        ),
        "schema": {"type": "string", "pattern": consistency.TOKEN_PATTERN},
    }
}
_SOURCE = {
    consistency.READ_SOURCE: _header(
        "Which source served the read: primary, a replica's name, or cache (this node's)"
    )
}
_BY_ANY = (429, 431, 503)
_WITH_BODY = (400, 413, 415, 422)


@functools.lru_cache(maxsize=4)
def _cursor_codec(secret: bytes) -> CursorCodec:
    # Keyed by purpose: a cursor of this listing is worth nothing in another one.
    return CursorCodec(secret, purpose="notes")


async def get_cursors(settings: SettingsDep) -> CursorCodec:
    """The notes listing's cursor codec, from the secret every node shares."""
    return _cursor_codec(settings.cursor_secret.get_secret_value().encode())


CursorsDep = Annotated[CursorCodec, Depends(get_cursors)]


def _etag_list(description: str) -> Any:
    """An If-Match / If-None-Match header: a list of ETags, its shape in the spec."""
    return Header(
        description=description,
        json_schema_extra={"type": "string", "pattern": conditional.LIST_PATTERN},
    )


# The hot read takes only the Request from FastAPI and its headers by hand
# (see cache.reads and deps.header_parameter).
_IF_NONE_MATCH = "if-none-match"
_GET_NOTE_OPENAPI = {
    "parameters": [
        header_parameter(
            _IF_NONE_MATCH,
            "An ETag you hold: 304 when the note still has it",
            conditional.LIST_PATTERN,
        ),
        *cache.READS_OPENAPI["parameters"],
    ]
}


def _not_found(note_id: uuid.UUID, headers: dict[str, str] | None = None) -> Problem:
    return Problem(404, f"note {note_id} does not exist", slug="not-found", headers=headers)


def _precondition_failed(current_version: int) -> Problem:
    return Problem(
        412,
        f"If-Match matches none of the note's current ETag {conditional.etag(current_version)}: "
        "the note has changed since you read it, or the tag is not one this service issued; "
        "GET it again and retry with its ETag",
        slug="precondition-failed",
        current_etag=conditional.etag(current_version),
    )


def _cache_key(note_id: uuid.UUID) -> str:
    return f"notes/{note_id}"


def _serialize(note: Note) -> bytes:
    return NoteOut.model_validate(note).model_dump_json().encode()


def _representation(row: dict[str, Any]) -> cache.Representation:
    return cache.Representation(row["version"], NoteOut(**row).model_dump_json().encode())


def _note_response(
    note: Note, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _serialize(note),
        status_code=status_code,
        media_type=JSON,
        headers={"ETag": conditional.etag(note.version), **(headers or {})},
    )


@router.post(
    "",
    status_code=201,
    response_model=NoteOut,
    dependencies=[Depends(require_json)],
    responses={
        201: {
            "headers": {
                **_ETAG,
                "Location": _header("The note's URL, relative", required=True),
                **_TOKEN,
                idempotency.REPLAYED: _header("true when this is the first response, replayed"),
            }
        },
        **idempotency.RESPONSES,
        **problem_responses(*_WITH_BODY, 409, *_BY_ANY),
    },
)
async def create_note(
    payload: NoteCreate, request: Request, write: idempotency.IdempotentWriteDep
) -> Response:
    """Create a note. With `Idempotency-Key`, a retry replays the first response."""

    async def create(session: AsyncSession) -> Response:
        note = await service.create_note(session, **payload.model_dump())
        # A relative reference stays right behind any proxy, whatever Host it rewrote.
        location = request.app.url_path_for("get_note", note_id=str(note.id))
        return _note_response(note, 201, {"Location": str(location)})

    return await write.run(create, body=payload)


@router.head("/{note_id}", include_in_schema=False)
@router.get(
    "/{note_id}",
    response_model=NoteOut,
    responses={
        200: {"headers": {**_ETAG, **_SOURCE}},
        304: {
            "description": "Not Modified: If-None-Match matched",
            "headers": {**_ETAG, **_SOURCE},
        },
        **problem_responses(400, 404, 422, *_BY_ANY),
    },
    openapi_extra=_GET_NOTE_OPENAPI,
)
async def get_note(note_id: uuid.UUID, request: Request) -> Response:
    """Read a note. Send its ETag in `If-None-Match` to get 304 when unchanged,
    and a write's `Consistency-Token` to be sure to see that write."""

    # A missing note is not cached: ids are the server's, so a miss is a deleted note or a guess.
    found, source = await cache.reads(request).get(
        _cache_key(note_id), service.NOTE_BY_ID, {"id": note_id}, _representation
    )
    if found is None:
        raise _not_found(note_id, consistency.headers(source=source))
    return found.response(source=source, if_none_match=request.headers.get(_IF_NONE_MATCH))


@router.head("", include_in_schema=False)
@router.get(
    "",
    response_model=NotePage,
    responses={200: {"headers": _SOURCE}, **problem_responses(400, 422, *_BY_ANY)},
)
async def list_notes(
    db: DatabaseDep,
    settings: SettingsDep,
    cursors: CursorsDep,
    min_lsn: MinLsnDep,
    limit: Annotated[
        int | None, Query(ge=1, description="Page size; capped at the maximum")
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            description="`next_cursor` of the previous page",
            # Documented, not enforced here: a cursor of another shape, or
            # one this service did not sign, gets the 400 problem below.
            json_schema_extra={
                "type": "string",
                "pattern": CursorCodec.PATTERN,
                "maxLength": CursorCodec.MAX_LENGTH,
            },
        ),
    ] = None,
) -> Response:
    """List notes oldest first, one page at a time."""
    page_size = min(limit or settings.page_limit_default, settings.page_limit_max)
    after: uuid.UUID | None = None
    if cursor is not None:
        try:
            after = uuid.UUID(str(cursors.decode(cursor)["after"]))
        except (InvalidCursor, KeyError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, InvalidCursor) else "the cursor is malformed"
            raise Problem(
                400,
                f"{reason}; pass a next_cursor exactly as a previous page returned it",
                slug="invalid-cursor",
            ) from None
    (notes, more), source = await db.run_read(
        lambda session: service.list_notes(session, after=after, limit=page_size),
        min_lsn=min_lsn,
    )
    next_cursor = cursors.encode({"after": str(notes[-1].id)}) if more else None
    page = NotePage(items=[NoteOut.model_validate(n) for n in notes], next_cursor=next_cursor)
    return Response(
        page.model_dump_json(), media_type=JSON, headers=consistency.headers(source=source)
    )


@router.patch(
    "/{note_id}",
    response_model=NoteOut,
    dependencies=[Depends(require_json)],
    responses={
        200: {"headers": {**_ETAG, **_TOKEN}},
        **problem_responses(*_WITH_BODY, 404, 412, 428, *_BY_ANY),
    },
)
async def update_note(
    note_id: uuid.UUID,
    patch: NotePatch,
    db: DatabaseDep,
    invalidations: cache.InvalidationsDep,
    if_match: Annotated[
        str | None, _etag_list("Required (428 without): the ETag you read; 412 when it is stale")
    ] = None,
) -> Response:
    """Change title and/or body. `If-Match` with the note's ETag is required."""
    if if_match is None:
        raise Problem(
            428,
            "send If-Match with the note's ETag (from GET) so concurrent edits are not lost",
            slug="precondition-required",
        )
    try:
        async with db.write() as session:
            note = await service.update_note(
                session,
                note_id=note_id,
                expected_versions=conditional.matching_versions(if_match),
                changes=patch.changes(),
            )
    except service.NoteNotFound:
        raise _not_found(note_id) from None
    except service.NoteVersionMismatch as exc:
        raise _precondition_failed(exc.current_version) from None
    invalidations.wrote(session, _cache_key(note_id))
    return _note_response(note, headers=consistency.headers(token=consistency_token(session)))


@router.delete(
    "/{note_id}",
    status_code=204,
    responses={204: {"headers": _TOKEN}, **problem_responses(400, 404, 412, 422, *_BY_ANY)},
)
async def delete_note(
    note_id: uuid.UUID,
    db: DatabaseDep,
    invalidations: cache.InvalidationsDep,
    if_match: Annotated[str | None, _etag_list("The ETag you read: 412 when it is stale")] = None,
) -> Response:
    """Delete a note; `If-Match` is honoured when given."""
    expected = None if if_match is None else conditional.matching_versions(if_match)
    try:
        async with db.write() as session:
            await service.delete_note(session, note_id=note_id, expected_versions=expected)
    except service.NoteNotFound:
        raise _not_found(note_id) from None
    except service.NoteVersionMismatch as exc:
        raise _precondition_failed(exc.current_version) from None
    invalidations.wrote(session, _cache_key(note_id))
    return Response(status_code=204, headers=consistency.headers(token=consistency_token(session)))
