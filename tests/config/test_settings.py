"""Small pieces with sharp edges: URLs, settings, ETags, cursors, ids."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service import conditional
from service.config import (
    SUPPORTED_DATABASE_URLS,
    Settings,
    UnsupportedDatabase,
    normalize_database_url,
)
from service.db.types import uuid7
from service.pagination import CursorCodec, InvalidCursor


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
    ("header", "versions"),
    [('"3"', [3]), ('"1", "2"', [1, 2]), ("*", None), ('W/"3"', []), ('"x"', []), ("", [])],
)
def test_if_match_uses_strong_comparison(header, versions):
    assert conditional.matching_versions(header) == versions


def test_if_none_match_uses_weak_comparison():
    assert conditional.none_match('W/"2"', 2)
    assert conditional.none_match('"1", "2"', 2)
    assert not conditional.none_match('"1"', 2)


def test_cursor_round_trip_and_tamper_evidence():
    codec = CursorCodec(b"secret", purpose="notes")
    cursor = codec.encode({"after": "abc"})
    assert codec.decode(cursor) == {"after": "abc"}
    with pytest.raises(InvalidCursor):
        CursorCodec(b"other", purpose="notes").decode(cursor)
    with pytest.raises(InvalidCursor):
        CursorCodec(b"secret", purpose="other-listing").decode(cursor)
    with pytest.raises(InvalidCursor):
        codec.decode("x" * 1000)


def test_uuid7_is_version_7_and_time_ordered():
    ids = [uuid7() for _ in range(2000)]
    assert all(i.version == 7 for i in ids)
    # Ordered across milliseconds; ids within one millisecond may come in any order.
    assert [i.int >> 80 for i in ids] == sorted(i.int >> 80 for i in ids)
    assert len(set(ids)) == len(ids)
