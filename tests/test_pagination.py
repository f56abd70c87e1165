"""Cursors: they round-trip, and any tampering is refused (service/pagination.py)."""

from __future__ import annotations

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
