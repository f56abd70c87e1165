"""Consistency tokens: read-your-writes across nodes without sticky sessions.

A write answers with `Consistency-Token`, the primary's WAL position after
its commit (on SQLite, the commit counter its transaction set). A read that
sends the token back is served only by a source that has replayed at least
that position. The token is opaque to clients; inside
it is `w1.<LSN as hex>`, versioned so its format can change.
"""

from __future__ import annotations

import re

HEADER = "Consistency-Token"
# Which source served a read ("primary", a replica's name, or "cache"), for attribution.
READ_SOURCE = "X-Read-Source"
# On SQLite the position is a commit counter in this one-row table (bumped by
# every write transaction, service/db/engines.py), so tokens order commits
# across every process sharing the file.
COMMIT_COUNTER = "commit_counter"
TOKEN_PATTERN = r"^w1\.[0-9a-f]{1,16}$"  # noqa: S105 (a format, not a secret)
_TOKEN = re.compile(r"^w1\.([0-9a-f]{1,16})$")


def headers(*, token: str | None = None, source: str | None = None) -> dict[str, str]:
    """The response headers saying what a write left behind or where a read ran.

    Every route takes them from here, so their names and their absence rules
    (no token when the WAL position was unavailable) are written once.
    """
    found = {}
    if token:
        found[HEADER] = token
    if source:
        found[READ_SOURCE] = source
    return found


class InvalidToken(ValueError):
    pass


def parse_lsn(text: str) -> int:
    """PostgreSQL's `X/Y` LSN notation as one integer."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def encode(lsn: int) -> str:
    return f"w1.{lsn:x}"


def decode(token: str) -> int:
    match = _TOKEN.match(token.strip())
    if match is None:
        raise InvalidToken(
            f"{HEADER} {token[:40]!r} was not issued by this service; send back the value "
            "of a write response's Consistency-Token header unchanged"
        )
    return int(match.group(1), 16)
