"""HTTP routes for notes: conditional requests, idempotent creates, keyset pages."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from service import conditional
from service.config import Settings
from service.db import consistency
from service.db.engines import Database, consistency_token
from service.deps import (
    CursorsDep,
    DatabaseDep,
    IdempotencyKey,
    MinLsnDep,
    SettingsDep,
    require_json,
)
from service.idempotency import service as idempotency
from service.notes import service
from service.notes.models import Note
from service.notes.schemas import NoteCreate, NoteOut, NotePage, NotePatch
from service.pagination import InvalidCursor
from service.problems import Problem

router = APIRouter(prefix="/v1/notes", tags=["notes"])

JSON = "application/json"


def _not_found(note_id: uuid.UUID, headers: dict[str, str] | None = None) -> Problem:
    return Problem(404, f"note {note_id} does not exist", slug="not-found", headers=headers)


def _precondition_failed(current_version: int) -> Problem:
    return Problem(
        412,
        "the note has changed since you read it; GET it again and retry with its ETag",
        slug="precondition-failed",
        current_etag=conditional.etag(current_version),
    )


def _note_response(
    note: Note, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        NoteOut.model_validate(note).model_dump_json(),
        status_code=status_code,
        media_type=JSON,
        headers={"ETag": conditional.etag(note.version), **(headers or {})},
    )


def _token_headers(token: str | None) -> dict[str, str]:
    return {consistency.HEADER: token} if token else {}


READ_SOURCE = "X-Read-Source"


@router.post(
    "",
    status_code=201,
    response_model=NoteOut,
    dependencies=[Depends(require_json)],
    responses={409: {"description": "Same Idempotency-Key still in flight"}},
)
async def create_note(
    payload: NoteCreate,
    request: Request,
    db: DatabaseDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Create a note. With `Idempotency-Key`, a retry replays the first response."""
    if idempotency_key is None:
        async with db.write() as session:
            note = await service.create_note(session, **payload.model_dump())
        return _created(request, note, consistency_token(session))

    async with idempotency.key_lock(
        db, idempotency_key, wait_s=settings.idempotency_wait_s
    ) as holder:
        claimed = await _claim(db, settings, idempotency_key, holder, request, payload)
        if isinstance(claimed, idempotency.StoredResponse):
            # The first response's write is committed: a token for "now" covers it.
            return Response(
                claimed.body,
                status_code=claimed.status_code,
                media_type=JSON,
                headers={
                    **claimed.headers,
                    **_token_headers(await db.current_token()),
                    "Idempotent-Replayed": "true",
                },
            )
        try:
            async with db.write() as session:
                note = await service.create_note(session, **payload.model_dump())
                response = _created(request, note)
                await idempotency.complete(
                    session,
                    claimed,
                    idempotency.StoredResponse(
                        status_code=response.status_code,
                        headers={k: response.headers[k] for k in ("location", "etag")},
                        body=bytes(response.body).decode(),
                    ),
                )
        except idempotency.LeaseLost:
            raise _in_flight(settings.idempotency_lease_s) from None
        except BaseException:
            # Shielded so a cancelled request still gives its key back.
            await asyncio.shield(idempotency.release(db, claimed))
            raise
    response.headers.update(_token_headers(consistency_token(session)))
    return response


async def _claim(
    db: Database,
    settings: Settings,
    key: str,
    holder: idempotency.Holder,
    request: Request,
    payload: NoteCreate,
) -> idempotency.Lease | idempotency.StoredResponse:
    try:
        return await idempotency.claim(
            db,
            key=key,
            fingerprint=idempotency.fingerprint("POST", request.url.path, payload.model_dump()),
            lease_s=settings.idempotency_lease_s,
            ttl_s=settings.idempotency_ttl_s,
            holder=holder,
        )
    except idempotency.KeyReused:
        raise Problem(
            422,
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new request",
            slug="idempotency-key-reused",
        ) from None
    except idempotency.KeyInFlight as exc:
        raise _in_flight(exc.retry_after_s) from None


def _in_flight(retry_after_s: float) -> Problem:
    seconds = max(1, round(retry_after_s))
    return Problem(
        409,
        "a request with this Idempotency-Key is still being processed; "
        f"retry in {seconds} s to get its response",
        slug="idempotency-key-in-flight",
        headers={"Retry-After": str(seconds)},
    )


def _created(request: Request, note: Note, token: str | None = None) -> Response:
    # A relative reference stays right behind any proxy, whatever Host it rewrote.
    location = request.app.url_path_for("get_note", note_id=str(note.id))
    return _note_response(note, 201, {"Location": str(location), **_token_headers(token)})


@router.get("/{note_id}", response_model=NoteOut, responses={304: {"description": "Not Modified"}})
async def get_note(
    note_id: uuid.UUID,
    db: DatabaseDep,
    min_lsn: MinLsnDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Read a note. Send its ETag in `If-None-Match` to get 304 when unchanged,
    and a write's `Consistency-Token` to be sure to see that write."""

    async def find(session: AsyncSession) -> Note | None:
        try:
            return await service.get_note(session, note_id=note_id)
        except service.NoteNotFound:
            return None

    note, source = await db.run_read(find, min_lsn=min_lsn)
    if note is None:
        raise _not_found(note_id, {READ_SOURCE: source})
    if if_none_match is not None and conditional.none_match(if_none_match, note.version):
        return Response(
            status_code=304, headers={"ETag": conditional.etag(note.version), READ_SOURCE: source}
        )
    return _note_response(note, headers={READ_SOURCE: source})


@router.get("", response_model=NotePage)
async def list_notes(
    db: DatabaseDep,
    settings: SettingsDep,
    cursors: CursorsDep,
    min_lsn: MinLsnDep,
    limit: Annotated[
        int | None, Query(ge=1, description="Page size; capped at the maximum")
    ] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
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
    return Response(page.model_dump_json(), media_type=JSON, headers={READ_SOURCE: source})


@router.patch(
    "/{note_id}",
    response_model=NoteOut,
    dependencies=[Depends(require_json)],
    responses={412: {"description": "ETag mismatch"}, 428: {"description": "If-Match missing"}},
)
async def update_note(
    note_id: uuid.UUID,
    patch: NotePatch,
    db: DatabaseDep,
    if_match: Annotated[str | None, Header()] = None,
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
    return _note_response(note, headers=_token_headers(consistency_token(session)))


@router.delete("/{note_id}", status_code=204, responses={412: {"description": "ETag mismatch"}})
async def delete_note(
    note_id: uuid.UUID,
    db: DatabaseDep,
    if_match: Annotated[str | None, Header()] = None,
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
    return Response(status_code=204, headers=_token_headers(consistency_token(session)))
