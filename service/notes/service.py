"""Notes business logic. Functions take the caller's session and never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.direct import RowRead
from service.db.types import utcnow, uuid7
from service.notes.models import Note


class NoteNotFound(LookupError):
    pass


class NoteVersionMismatch(Exception):
    def __init__(self, current_version: int) -> None:
        super().__init__(f"current version is {current_version}")
        self.current_version = current_version


async def create_note(session: AsyncSession, *, title: str, body: str) -> Note:
    now = utcnow()
    note = Note(id=uuid7(), title=title, body=body, version=1, created_at=now, updated_at=now)
    session.add(note)
    await session.flush()
    return note


# The hot read (GET /v1/notes/{id}): on the driver itself, see service/db/direct.py.
NOTE_BY_ID = RowRead(
    select(Note.id, Note.title, Note.body, Note.version, Note.created_at, Note.updated_at).where(
        Note.id == bindparam("id")
    )
)


async def list_notes(
    session: AsyncSession, *, after: uuid.UUID | None, limit: int
) -> tuple[Sequence[Note], bool]:
    """One page in id (= creation) order, and whether more follow."""
    query = select(Note).order_by(Note.id).limit(limit + 1)
    if after is not None:
        query = query.where(Note.id > after)
    rows = (await session.scalars(query)).all()
    return rows[:limit], len(rows) > limit


async def _current_version(session: AsyncSession, note_id: uuid.UUID) -> int:
    version = await session.scalar(select(Note.version).where(Note.id == note_id))
    if version is None:
        raise NoteNotFound(note_id)
    return version


async def update_note(
    session: AsyncSession,
    *,
    note_id: uuid.UUID,
    expected_versions: Sequence[int] | None,
    changes: dict[str, str],
) -> Note:
    """Apply `changes` if the note is at one of `expected_versions` (None: any).

    The version check and the write are one conditional UPDATE, so of two
    writers holding the same ETag exactly one succeeds.
    """
    query = update(Note).where(Note.id == note_id)
    if expected_versions is not None:
        query = query.where(Note.version.in_(expected_versions))
    query = query.values(**changes, version=Note.version + 1, updated_at=utcnow()).returning(Note)
    note = (await session.scalars(query, execution_options={"synchronize_session": False})).first()
    if note is None:
        raise NoteVersionMismatch(await _current_version(session, note_id))
    return note


async def delete_note(
    session: AsyncSession, *, note_id: uuid.UUID, expected_versions: Sequence[int] | None
) -> None:
    query = delete(Note).where(Note.id == note_id)
    if expected_versions is not None:
        query = query.where(Note.version.in_(expected_versions))
    deleted = (await session.execute(query.returning(Note.id))).first()
    if deleted is None:
        raise NoteVersionMismatch(await _current_version(session, note_id))
