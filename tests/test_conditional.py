"""ETag comparison for conditional requests (service/conditional.py)."""

from __future__ import annotations

import pytest

from service import conditional


@pytest.mark.parametrize(
    ("header", "versions"),
    [
        ('"3"', [3]),
        ('"1", "2"', [1, 2]),
        ('"2", "2" ,, "1",', [1, 2]),
        ("*", None),
        ('W/"3"', []),
        ('"x"', []),
        ("", []),
        ('"03"', []),
        ('"²"', []),
        ('"a,b", "4"', [4]),
        ('"9223372036854775808"', []),
    ],
)
def test_if_match_uses_strong_comparison(header, versions):
    assert conditional.matching_versions(header) == versions


@pytest.mark.parametrize("header", ['"1', "abc", '"1" "2"', "W/ '1'", '"1";'])
def test_a_value_that_is_not_a_list_of_entity_tags_is_refused(header):
    with pytest.raises(conditional.InvalidEntityTags) as refused:
        conditional.matching_versions(header)
    assert refused.value.status == 400
    with pytest.raises(conditional.InvalidEntityTags):
        conditional.none_match(header, 1)


def test_the_number_of_tags_is_bounded():
    at_limit = ", ".join(f'"{n}"' for n in range(conditional.MAX_ENTITY_TAGS))
    assert len(conditional.matching_versions(at_limit) or []) == conditional.MAX_ENTITY_TAGS
    with pytest.raises(conditional.InvalidEntityTags, match="more than"):
        conditional.matching_versions(at_limit + ', "x"')


def test_if_none_match_uses_weak_comparison():
    assert conditional.none_match('W/"2"', 2)
    assert conditional.none_match('"1", "2"', 2)
    assert not conditional.none_match('"1"', 2)
