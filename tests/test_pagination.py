"""Cursors: they round-trip, and any tampering is refused (service/pagination.py)."""

from __future__ import annotations

import re

import pytest

from service.pagination import CursorCodec, InvalidCursor


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


def test_every_issued_cursor_has_the_documented_shape() -> None:
    # The OpenAPI description states this shape; schemathesis trusts it.
    codec = CursorCodec(b"s" * 32, purpose="notes")
    for after in ("", "x", "01a214fa-a11d-778e-9b9d-57cccfa17b14", "ü" * 40):
        cursor = codec.encode({"after": after})
        assert re.fullmatch(CursorCodec.PATTERN, cursor), cursor
        assert len(cursor) <= CursorCodec.MAX_LENGTH
