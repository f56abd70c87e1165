"""The packages this service is made of: a new domain is a folder plus one line here.

Every domain is a package `service/<name>/` with the same files: `router.py`
(an APIRouter named `router`), `models.py` (its tables on `service.db.base.Base`)
and `migrations/` (its own Alembic branch, labelled `<name>`). The app serves
the routers; the database layer and Alembic get the tables and migration
folders from here, so neither needs to know any domain by name.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fastapi import APIRouter

from service.db import migrate
from service.db.base import Base

# The domains this service serves (README: "Replace the example domain").
DOMAINS: tuple[str, ...] = ("notes",)

# Infrastructure packages that own tables, with migrations of their own.
INFRASTRUCTURE: tuple[str, ...] = ("idempotency", "cache")

_ROOT = Path(__file__).parent


def routers(domains: tuple[str, ...] = DOMAINS) -> list[APIRouter]:
    """The API of each domain, in the order listed."""
    found = []
    for name in domains:
        router = importlib.import_module(f"service.{name}.router").router
        if not isinstance(router, APIRouter):
            raise TypeError(f"service/{name}/router.py: `router` must be a fastapi.APIRouter")
        found.append(router)
    return found


def schema() -> migrate.Schema:
    """Every table of the build and the folders holding their migrations."""
    owners = INFRASTRUCTURE + DOMAINS
    for name in owners:
        importlib.import_module(f"service.{name}.models")  # registers its tables on Base
    return migrate.Schema(
        metadata=Base.metadata,
        locations=tuple(_ROOT / name / "migrations" for name in owners),
    )
