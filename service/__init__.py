"""cattle: a stateless API node built to be one of many identical, disposable nodes.

`NAME` is the service's name in one place: the settings' environment prefix,
metric names, problem type URNs, advisory-lock ids, telemetry's `service.name`
and the log's service field all derive from it. A fork renames the service
by changing this line (the fork tool does it for you).
"""

import hashlib

NAME = "cattle"
ENV_PREFIX = NAME.upper() + "_"

__version__ = "0.1.0"


def advisory_lock_id(purpose: str, *, bits: int = 64) -> int:
    """A PostgreSQL advisory-lock key for one `purpose` of this service.

    Derived from NAME by a stable hash (not Python's salted `hash`), so every
    node and every `migrate` run computes the same key, two services sharing
    a database do not take each other's locks, and a fork gets its own keys
    without editing a number. `bits` is 64 for `pg_advisory_lock(bigint)` and
    32 for a namespace of `pg_advisory_lock(int, int)`; the key is signed, as
    PostgreSQL's integers are.
    """
    digest = hashlib.blake2b(f"{NAME}:{purpose}".encode(), digest_size=bits // 8).digest()
    return int.from_bytes(digest, "big", signed=True)
