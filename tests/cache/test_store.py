"""The read cache's rules, one by one, on a clock the test moves.

Each rule has its broken variant beside it (a switch of service.cache.store
turned off, or the rule's input removed) to show the test can fail.
"""

from __future__ import annotations

import inspect

import pytest

from service.bus import InvalidationSink
from service.cache import store
from service.cache.store import ReadCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def cache_of(clock: Clock, **overrides) -> ReadCache:
    options = {"max_entries": 100, "ttl_s": 1.0, "tombstone_keep_s": 5.0, "clock": clock}
    return ReadCache(**{**options, **overrides})


def fill(cache: ReadCache, key: str, value: object, stamp: int | None, clock: Clock) -> bool:
    return cache.fill(key, value, stamp=stamp, read_at=clock.now)


def test_the_lru_holds_at_most_max_entries_and_drops_the_least_recently_used(clock):
    cache = cache_of(clock, max_entries=2)
    fill(cache, "a", 1, 1, clock)
    fill(cache, "b", 2, 1, clock)
    assert cache.get("a") == 1  # a is now the most recent
    fill(cache, "c", 3, 1, clock)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    assert cache.stats()["evictions"] == 1
    assert cache.stats()["size"] == 2


def test_an_entry_lives_ttl_from_when_its_read_began(clock):
    cache = cache_of(clock, ttl_s=1.0)
    began = clock.now
    clock.now += 0.4  # the read took 0.4 s
    assert cache.fill("a", 1, stamp=1, read_at=began)
    clock.now = began + 0.99
    assert cache.get("a") == 1
    clock.now = began + 1.0
    assert cache.get("a") is None


def test_a_fill_whose_read_began_over_ttl_ago_is_not_stored(clock):
    cache = cache_of(clock, ttl_s=1.0)
    began = clock.now
    clock.now += 1.5
    assert not cache.fill("a", 1, stamp=1, read_at=began)
    assert cache.get("a") is None


def test_a_fill_without_a_position_is_not_stored(clock):
    cache = cache_of(clock)
    assert not fill(cache, "a", 1, None, clock)
    assert cache.get("a") is None


def test_a_token_hits_only_an_entry_stamped_at_or_after_it(clock):
    cache = cache_of(clock)
    fill(cache, "a", "old", 10, clock)
    assert cache.get("a", min_lsn=9) == "old"
    assert cache.get("a", min_lsn=10) == "old"
    assert cache.get("a", min_lsn=11) is None
    assert cache.get("a") == "old"  # kept for readers without a newer token


def test_broken_variant_without_stamps_a_newer_token_gets_the_old_value(clock, monkeypatch):
    monkeypatch.setattr(store, "STAMPS", False)
    cache = cache_of(clock)
    fill(cache, "a", "old", 10, clock)
    assert cache.get("a", min_lsn=11) == "old"


def test_a_newer_fill_is_not_replaced_by_an_older_one(clock):
    cache = cache_of(clock)
    fill(cache, "a", "new", 20, clock)
    assert not fill(cache, "a", "old", 10, clock)
    assert cache.get("a") == "new"


def test_an_invalidation_drops_the_entry_and_refuses_older_fills(clock):
    cache = cache_of(clock)
    fill(cache, "a", "old", 10, clock)
    cache.invalidate(["a"], 15)
    assert cache.get("a") is None
    # A read stamped before the write, finishing after its invalidation.
    assert not fill(cache, "a", "old", 14, clock)
    assert cache.get("a") is None
    assert cache.stats()["refused"] == 1
    assert fill(cache, "a", "new", 15, clock)  # stamped at the write: it has it
    assert cache.get("a") == "new"


def test_broken_variant_without_tombstones_the_old_value_comes_back(clock, monkeypatch):
    monkeypatch.setattr(store, "TOMBSTONES", False)
    cache = cache_of(clock)
    cache.invalidate(["a"], 15)
    assert fill(cache, "a", "old", 14, clock)
    assert cache.get("a") == "old"


def test_a_tombstone_expires_after_its_keep_time(clock):
    cache = cache_of(clock, ttl_s=1.0, tombstone_keep_s=3.0)
    cache.invalidate(["a"], 15)
    clock.now += 2.9
    assert not fill(cache, "a", "old", 14, clock)
    clock.now += 0.2
    assert fill(cache, "a", "old", 14, clock)


def test_tombstones_must_outlive_entries():
    with pytest.raises(ValueError, match="outlive"):
        ReadCache(max_entries=1, ttl_s=2.0, tombstone_keep_s=1.0)


def test_an_invalidation_of_unknown_position_refuses_every_fill_of_the_key(clock):
    cache = cache_of(clock, tombstone_keep_s=3.0)
    cache.invalidate(["a"], None)
    assert not fill(cache, "a", "v", 10**12, clock)
    assert fill(cache, "b", "v", 1, clock)  # other keys are not affected
    clock.now += 3.1
    assert fill(cache, "a", "v", 1, clock)


def test_a_tombstone_dropped_for_room_leaves_its_rule_for_every_key(clock):
    cache = cache_of(clock, max_tombstones=2, tombstone_keep_s=60.0)
    cache.invalidate(["a"], 50)
    cache.invalidate(["b"], 60)
    cache.invalidate(["c"], 70)  # pushes a's tombstone out
    assert cache.stats()["tombstones"] == 2
    assert not fill(cache, "a", "old", 49, clock)  # still refused, by the floor
    assert not fill(cache, "z", "old", 49, clock)  # the floor holds for all keys
    assert fill(cache, "z", "v", 50, clock)
    assert not fill(cache, "b", "old", 59, clock)  # b keeps its own tombstone


def test_a_tombstone_of_unknown_position_dropped_for_room_refuses_every_fill_until_it_ends(clock):
    cache = cache_of(clock, max_tombstones=1, tombstone_keep_s=10.0)
    cache.invalidate(["a"], None)
    cache.invalidate(["b"], 5)
    assert not fill(cache, "a", "v", 10**12, clock)
    assert not fill(cache, "z", "v", 10**12, clock)
    clock.now += 10.1
    assert fill(cache, "a", "v", 10**12, clock)


def test_invalidate_older_than_drops_older_entries_and_refuses_older_fills(clock):
    cache = cache_of(clock)
    fill(cache, "old", 1, 10, clock)
    fill(cache, "new", 2, 30, clock)
    cache.invalidate_older_than(20)
    assert cache.get("old") is None
    assert cache.get("new") == 2
    assert not fill(cache, "old", 1, 19, clock)
    assert fill(cache, "old", 1, 20, clock)


def test_invalidate_older_than_none_drops_everything_and_refuses_reads_begun_before(clock):
    cache = cache_of(clock)
    fill(cache, "a", 1, 10, clock)
    began = clock.now
    clock.now += 0.1
    cache.invalidate_older_than(None)
    assert cache.get("a") is None
    assert not cache.fill("a", 1, stamp=10**12, read_at=began)  # began before the drop
    clock.now += 0.1
    assert fill(cache, "a", 1, 10, clock)  # began after it


def test_a_local_write_invalidates_before_it_publishes(clock):
    cache = cache_of(clock)
    seen = []
    cache.publish = lambda keys, lsn: seen.append((list(keys), lsn, cache.get(keys[0])))
    fill(cache, "a", "old", 10, clock)
    cache.wrote(["a"], 15)
    assert seen == [(["a"], 15, None)]
    assert not fill(cache, "a", "old", 14, clock)  # a local write tombstones too


def test_stats_count_hits_misses_refusals_and_evictions(clock):
    cache = cache_of(clock, max_entries=1)
    cache.get("a")
    fill(cache, "a", 1, 10, clock)
    cache.get("a")
    fill(cache, "b", 1, 10, clock)
    cache.invalidate(["c"], 20)
    fill(cache, "c", 1, 10, clock)
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "refused": 1,
        "evictions": 1,
        "size": 1,
        "tombstones": 1,
    }


def test_the_cache_is_what_the_bus_calls():
    """The bus's InvalidationSink, method for method (the cache may not import it)."""
    for name in ("invalidate", "invalidate_older_than"):
        expected = inspect.signature(getattr(InvalidationSink, name))
        assert inspect.signature(getattr(ReadCache, name)) == expected, name
