"""Settings: database URLs, the defaults, the environment, production refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import (
    SUPPORTED_DATABASE_URLS,
    Settings,
    UnsupportedDatabase,
    normalize_database_url,
    redact_url,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
        ("sqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
    ],
)
def test_database_urls_get_async_drivers(given, expected):
    assert normalize_database_url(given) == expected


@pytest.mark.parametrize(
    "url",
    ["mysql://h/db", "just-a-path", "postgresql+psycopg://h/db", "postgresql+psycopg2://h/db"],
)
def test_unsupported_database_urls_say_what_works(url):
    # Only asyncpg and aiosqlite are in the lock: any other driver is refused
    # up front, and the refusal lists the URLs that do work.
    with pytest.raises(UnsupportedDatabase) as refused:
        normalize_database_url(url)
    assert SUPPORTED_DATABASE_URLS in str(refused.value)
    for scheme in ("sqlite:///", "postgresql://", "postgresql+asyncpg://"):
        assert scheme in SUPPORTED_DATABASE_URLS


def test_default_database_is_sqlite_under_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.effective_database_url == f"sqlite+aiosqlite:///{tmp_path / 'cattle.db'}"


def test_production_refuses_the_development_cursor_secret():
    with pytest.raises(ValidationError, match="CATTLE_CURSOR_SECRET"):
        Settings(environment="production")
    Settings(environment="production", cursor_secret="a-private-secret-of-length")


def test_settings_come_from_cattle_variables(monkeypatch):
    monkeypatch.setenv("CATTLE_PORT", "9001")
    monkeypatch.setenv("CATTLE_NODE_ID", "n7")
    monkeypatch.setenv("CATTLE_MAX_BODY_BYTES", "4096")
    settings = Settings()
    assert (settings.port, settings.node_id, settings.max_body_bytes) == (9001, "n7", 4096)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            "postgresql+asyncpg://app:s3cret@h1:5432,h2:5432/app?target_session_attrs=read-write",
            "postgresql+asyncpg://app:***@h1:5432,h2:5432/app?target_session_attrs=read-write",
        ),
        (
            "postgresql://app@db/app?password=s3cret&sslmode=require",
            "postgresql://app@db/app?password=***&sslmode=require",
        ),
        ("postgresql://app:p@ss@db/app", "postgresql://app:***@db/app"),
        ("s3cret", "***"),
        ("sqlite+aiosqlite:///var/cattle.db", "sqlite+aiosqlite:///var/cattle.db"),
    ],
)
def test_urls_in_messages_never_show_a_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_a_value_that_is_not_a_url_is_not_echoed() -> None:
    with pytest.raises(UnsupportedDatabase) as caught:
        normalize_database_url("hunter2hunter2")
    assert "hunter2" not in str(caught.value)
