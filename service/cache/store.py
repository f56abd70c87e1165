"""The per-process read cache: a bounded LRU of reads by id, stamped, short-lived, tombstoned.

A stamp is a position in the source's commit order (a PostgreSQL WAL
position, or SQLite's commit counter; service/db/engines.py reads it), and
means: every write whose consistency token is at or below the stamp is in
this value. Three rules keep the cache from being wrong:

- a read carrying a token hits only an entry stamped at or after the token
  (otherwise it goes to a source that has the write, as without a cache);
- an entry lives at most the TTL from the moment its stamp was read, so a
  value whose invalidation never arrived is gone within TTL;
- an invalidation (local write or a peer's) leaves a tombstone, key ->
  the write's position: a fill stamped before it is a read that began
  before the write reached its source, and is not stored.

Everything here runs on the event loop's thread and never blocks or awaits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Test-only switches, like idempotency's LOCKING: False turns a rule off so a
# test can show the broken variant serves a stale value.
STAMPS = True  # a token is checked against the entry's stamp
TOMBSTONES = True  # invalidations leave tombstones that refuse older fills

# A peer write whose position is unknown (None) tombstones its keys with this:
# no stamp is at or after it, so every fill of the key is refused until the
# tombstone expires.
_UNKNOWN = float("inf")

Publisher = Callable[[Sequence[str], int | None], None]


@dataclass(frozen=True, slots=True)
class Entry:
    value: Any  # immutable: shared by every request that hits it
    stamp: int
    expires_at: float  # monotonic: stamp read time + TTL


class ReadCache:
    """Bounded LRU of immutable values by key, each stamped with its source's position.

    `publish` (optional) tells the other nodes about a local write; the
    lifespan hands it over (the bus's `publish_invalidations`). The methods
    `invalidate` and `invalidate_older_than` are what the bus calls.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        ttl_s: float,
        tombstone_keep_s: float,
        max_tombstones: int | None = None,
        publish: Publisher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tombstone_keep_s < ttl_s:
            raise ValueError("tombstones must outlive entries (tombstone_keep_s >= ttl_s)")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.tombstone_keep_s = tombstone_keep_s
        self.max_tombstones = max_tombstones if max_tombstones is not None else max_entries
        self.publish = publish
        self.clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        # key -> (position of the write, monotonic expiry); oldest first.
        self._tombstones: OrderedDict[str, tuple[float, float]] = OrderedDict()
        # Fills stamped below this are refused, for every key: what a tombstone
        # dropped for room, or a detected loss, leaves behind. Only rises.
        self._floor: float = 0
        # Fills of reads that began before this moment are refused (the last
        # drop-everything): they may hold a value whose invalidation was lost.
        self._dropped_all_at = float("-inf")
        # Every fill is refused until then: a tombstone of unknown position
        # was dropped for room before it expired.
        self._refuse_until = float("-inf")
        self.hits = 0
        self.misses = 0
        self.refused = 0  # fills refused by a tombstone, the floor or a drop
        self.evictions = 0  # entries pushed out by the size bound

    # -- reads ------------------------------------------------------------------

    def get(self, key: str, *, min_lsn: int | None = None) -> Any | None:
        """The value cached for `key`, if fresh and at or after `min_lsn`; else None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires_at <= self.clock():
            del self._entries[key]
            self.misses += 1
            return None
        if min_lsn is not None and entry.stamp < min_lsn and STAMPS:
            # Too old for this reader; kept for readers with older or no tokens.
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.value

    def fill(self, key: str, value: Any, *, stamp: int | None, read_at: float) -> bool:
        """Store `value`, read at source position `stamp` whose reading began at
        `read_at` (monotonic, taken before the stamp was read). False when refused."""
        now = self.clock()
        expires_at = read_at + self.ttl_s
        if stamp is None or expires_at <= now:
            return False
        if read_at < self._dropped_all_at or now < self._refuse_until or stamp < self._floor:
            self.refused += 1
            return False
        if TOMBSTONES:
            tombstone = self._tombstones.get(key)
            if tombstone is not None:
                position, until = tombstone
                if until <= now:
                    del self._tombstones[key]
                elif stamp < position:
                    self.refused += 1
                    return False
        current = self._entries.get(key)
        if current is not None and current.stamp > stamp and current.expires_at > now:
            return False  # a newer read got there first: keep it
        self._entries[key] = Entry(value, stamp, expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1
        return True

    # -- invalidation -------------------------------------------------------------

    def wrote(self, keys: Sequence[str], lsn: int | None) -> None:
        """This node wrote `keys`, committed at `lsn`: forget them here, then tell the peers.

        Called before the write's response leaves, so the writer's next read
        on this node cannot hit the old value.
        """
        self.invalidate(keys, lsn)
        if self.publish is not None:
            self.publish(keys, lsn)

    def invalidate(self, keys: Sequence[str], lsn: int | None) -> None:
        """`keys` changed at `lsn` (None: position unknown): drop them, leave tombstones."""
        position = _UNKNOWN if lsn is None else lsn
        until = self.clock() + self.tombstone_keep_s
        for key in keys:
            self._entries.pop(key, None)
            old = self._tombstones.pop(key, None)
            self._tombstones[key] = (position if old is None else max(old[0], position), until)
        self._trim_tombstones()

    def invalidate_older_than(self, lsn: int | None) -> None:
        """Invalidations may have been lost: drop every entry stamped before `lsn`
        (None: every entry), and refuse fills of reads that could predate them."""
        if lsn is None:
            self._entries.clear()
            self._dropped_all_at = self.clock()
            return
        self._floor = max(self._floor, lsn)
        for key in [k for k, e in self._entries.items() if e.stamp < lsn]:
            del self._entries[key]

    def _trim_tombstones(self) -> None:
        now = self.clock()
        # Oldest first (each invalidation moves its key to the end), so the
        # expired ones are at the front.
        while self._tombstones:
            key, (position, until) = next(iter(self._tombstones.items()))
            if until > now and len(self._tombstones) <= self.max_tombstones:
                break
            del self._tombstones[key]
            if until > now:
                # Dropped for room while still needed: its rule becomes the
                # floor for every key, which refuses more but never less.
                if position == _UNKNOWN:
                    self._refuse_until = max(self._refuse_until, until)
                else:
                    self._floor = max(self._floor, position)

    # -- reporting ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since start, and sizes: for heartbeats and metrics."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "refused": self.refused,
            "evictions": self.evictions,
            "size": len(self._entries),
            "tombstones": len(self._tombstones),
        }
