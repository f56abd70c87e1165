"""ETag comparison for conditional requests (service/conditional.py)."""

from __future__ import annotations

import pytest

from service import conditional


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
