"""Strong ETags from row versions, and the If-Match / If-None-Match rules (RFC 9110)."""

from __future__ import annotations

ANY = "*"


def etag(version: int) -> str:
    return f'"{version}"'


def parse_entity_tags(header: str) -> list[str] | None:
    """The tags of an If-Match / If-None-Match header; None means `*`."""
    if header.strip() == ANY:
        return None
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def matching_versions(header: str) -> list[int] | None:
    """Versions an If-Match header accepts (strong comparison); None for `*`.

    Weak tags (W/"3") and tags that are not ours match nothing, so a request
    carrying only those fails the precondition, as RFC 9110 requires.
    """
    tags = parse_entity_tags(header)
    if tags is None:
        return None
    versions = []
    for tag in tags:
        inner = tag[1:-1] if len(tag) >= 2 and tag[0] == tag[-1] == '"' else ""
        if inner.isdigit() and len(inner) < 19:
            versions.append(int(inner))
    return versions


def none_match(header: str, version: int) -> bool:
    """True when If-None-Match matches the current representation (weak comparison)."""
    tags = parse_entity_tags(header)
    if tags is None:
        return True
    current = etag(version)
    return any(tag.removeprefix("W/") == current for tag in tags)
