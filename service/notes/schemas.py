"""What clients send and receive for notes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _no_nul(text: str) -> str:
    # PostgreSQL's text cannot hold U+0000 (SQLite's can): refused here, both
    # backends answer alike, with a 422 that says why.
    if "\x00" in text:
        raise ValueError("must not contain the NUL character (U+0000)")
    return text


# The pattern documents the rule in OpenAPI; the validator enforces it with
# a message a client can act on.
_TEXT = Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})
Title = Annotated[
    str, Field(min_length=1, max_length=200, examples=["Groceries"]), _TEXT, AfterValidator(_no_nul)
]
Body = Annotated[
    str, Field(max_length=10_000, examples=["milk, eggs"]), _TEXT, AfterValidator(_no_nul)
]


class NoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title
    body: Body = ""


def _patch_schema(schema: dict[str, Any]) -> None:
    # What a client may send: one field or both, never null (a merge patch's
    # null would delete the field, and both are required on a note).
    schema["minProperties"] = 1
    for field in schema["properties"].values():
        field.update(next(s for s in field.pop("anyOf") if s.get("type") != "null"))
        field.pop("default", None)


class NotePatch(BaseModel):
    """A JSON merge patch of the client-owned fields; at least one is given."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_patch_schema)

    title: Title | None = None
    body: Body | None = None

    @model_validator(mode="after")
    def _not_empty_nor_null(self) -> NotePatch:
        if not self.model_fields_set:
            raise ValueError("give at least one of: title, body")
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self

    def changes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class NoteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    title: str
    body: str
    version: int
    created_at: datetime
    updated_at: datetime


class NotePage(BaseModel):
    items: list[NoteOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
