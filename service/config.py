"""The one settings object: every knob of a node, read from CATTLE_* variables."""

from __future__ import annotations

import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Shipped so `make run` works with no configuration; refused in production.
DEV_CURSOR_SECRET = "cattle-development-cursor-secret"  # noqa: S105


class Environment(StrEnum):
    development = "development"
    production = "production"


class UnsupportedDatabase(ValueError):
    """A database URL whose scheme cattle has no driver for."""


def normalize_database_url(url: str) -> str:
    """Map the URLs people write to the async drivers cattle ships.

    `postgresql://` and `postgres://` get asyncpg; `sqlite:///` gets aiosqlite.
    Explicit `+asyncpg`, `+psycopg` and `+aiosqlite` are kept as given.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UnsupportedDatabase(
            f"{url!r} is not a URL; use sqlite+aiosqlite:///path/to/file.db "
            "or postgresql://user@host:5432/dbname"
        )
    base, _, driver = scheme.partition("+")
    if base in ("postgresql", "postgres"):
        if driver in ("", "asyncpg"):
            return f"postgresql+asyncpg://{rest}"
        if driver == "psycopg":
            return f"postgresql+psycopg://{rest}"
    elif base == "sqlite" and driver in ("", "aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    raise UnsupportedDatabase(
        f"unsupported database URL scheme {scheme!r}; use sqlite+aiosqlite:///path "
        "or postgresql:// (asyncpg) / postgresql+psycopg://"
    )


def _default_node_id() -> str:
    return socket.gethostname()


class Settings(BaseSettings):
    """Everything a node needs, validated at start so a bad value fails fast."""

    model_config = SettingsConfigDict(env_prefix="CATTLE_", extra="ignore", frozen=True)

    environment: Environment = Environment.development
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    node_id: str = Field(default_factory=_default_node_id, min_length=1, max_length=128)
    data_dir: Path = Path("var")
    database_url: str | None = None
    db_pool_size: int = Field(default=10, ge=1, le=200)
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    db_statement_timeout_s: float = Field(default=10.0, gt=0)

    max_body_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    page_limit_default: int = Field(default=20, ge=1)
    page_limit_max: int = Field(default=100, ge=1, le=1000)
    cursor_secret: SecretStr = SecretStr(DEV_CURSOR_SECRET)

    idempotency_ttl_s: float = Field(default=24 * 3600, gt=0)
    idempotency_lease_s: float = Field(default=10.0, gt=0)
    idempotency_purge_interval_s: float = Field(default=300.0, gt=0)

    # Comma separated; NoDecode keeps pydantic-settings from expecting JSON.
    cors_origins: Annotated[list[str], NoDecode] = []

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        return None if value in (None, "") else normalize_database_url(value)

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment is Environment.production:
            secret = self.cursor_secret.get_secret_value()
            if secret == DEV_CURSOR_SECRET or len(secret) < 16:
                raise ValueError(
                    "CATTLE_CURSOR_SECRET must be set to a private value of at least "
                    "16 characters in production (the same on every node)"
                )
        if self.page_limit_default > self.page_limit_max:
            raise ValueError("CATTLE_PAGE_LIMIT_DEFAULT must not exceed CATTLE_PAGE_LIMIT_MAX")
        return self

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the embedded SQLite file under data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'cattle.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")
