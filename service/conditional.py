"""Strong ETags from row versions, and the If-Match / If-None-Match rules (RFC 9110)."""

from __future__ import annotations

import re

from service.problems import Problem

ANY = "*"

# A client compares against the one ETag it holds, so a real list is short.
# Bounding it keeps a crafted header from growing a query's parameter list
# past what the database accepts (which would look like an outage).
MAX_ENTITY_TAGS = 64

# One list element of RFC 9110 section 8.8.3 (`[ W/ ] DQUOTE *etagc DQUOTE`,
# etagc = %x21 / %x23-7E / obs-text) with its separator; empty elements are
# allowed, as in every #rule list (section 5.6.1). Starlette decodes header
# bytes as latin-1, so obs-text is U+0080 to U+00FF here.
_ELEMENT = re.compile(r'[ \t]*(?:((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")[ \t]*)?(,|\Z)')
# Our tags are decimal versions in ASCII: "²" or "٣" pass str.isdigit, not this.
# Strong comparison is character by character, so "03" is not "3".
_VERSION = re.compile(r'"(0|[1-9][0-9]{0,17})"')


# The same grammar for OpenAPI: `*`, or a list of entity tags.
LIST_PATTERN = (
    r'^(\*|[ \t]*((W/)?"[\x21\x23-\x7e]*"[ \t]*)?(,[ \t]*((W/)?"[\x21\x23-\x7e]*"[ \t]*)?)*)$'
)


class InvalidEntityTags(Problem):
    """An If-Match / If-None-Match value that is not a list of entity tags, or too long."""

    def __init__(self, header: str, reason: str) -> None:
        super().__init__(
            400,
            f"{header} {reason}; send * or the ETag a response gave you, "
            'e.g. "3" (a list may hold up to '
            f"{MAX_ENTITY_TAGS} tags, separated by commas)",
            slug="invalid-entity-tag",
        )


def etag(version: int) -> str:
    return f'"{version}"'


def parse_entity_tags(value: str, *, header: str = "If-Match") -> list[str] | None:
    """The tags of an If-Match / If-None-Match value; None means `*`.

    Raises InvalidEntityTags (a 400 problem) for a value that breaks the
    grammar or holds more than MAX_ENTITY_TAGS tags.
    """
    if value.strip(" \t") == ANY:
        return None
    tags: list[str] = []
    position = 0
    while position < len(value):
        element = _ELEMENT.match(value, position)
        if element is None:
            shown = value[position : position + 20]
            raise InvalidEntityTags(
                header, f"is not a list of entity tags (at character {position}: {shown!r})"
            )
        if element.group(1):
            tags.append(element.group(1))
            if len(tags) > MAX_ENTITY_TAGS:
                raise InvalidEntityTags(header, f"holds more than {MAX_ENTITY_TAGS} entity tags")
        if not element.group(2):
            break
        position = element.end()
    return tags


def matching_versions(header: str) -> list[int] | None:
    """Versions an If-Match header accepts (strong comparison); None for `*`.

    Weak tags (W/"3") and tags that are not ours match nothing, so a request
    carrying only those fails the precondition, as RFC 9110 requires.
    """
    tags = parse_entity_tags(header, header="If-Match")
    if tags is None:
        return None
    versions = {int(found.group(1)) for tag in tags if (found := _VERSION.fullmatch(tag))}
    return sorted(versions)


def none_match(header: str, version: int) -> bool:
    """True when If-None-Match matches the current representation (weak comparison)."""
    tags = parse_entity_tags(header, header="If-None-Match")
    if tags is None:
        return True
    current = etag(version)
    return any(tag.removeprefix("W/") == current for tag in tags)
