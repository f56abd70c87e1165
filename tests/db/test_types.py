"""Column types and ids (service/db/types.py)."""

from __future__ import annotations

from service.db.types import uuid7


def test_uuid7_is_version_7_and_time_ordered():
    ids = [uuid7() for _ in range(2000)]
    assert all(i.version == 7 for i in ids)
    # Ordered across milliseconds; ids within one millisecond may come in any order.
    assert [i.int >> 80 for i in ids] == sorted(i.int >> 80 for i in ids)
    assert len(set(ids)) == len(ids)
