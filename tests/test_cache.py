"""The LRU cache: bounded, and one computation per key even under concurrent requests."""

import threading
import time

import torch

from lib.core.cache import LRUCache


def test_lru_evicts_least_recently_used():
    cache = LRUCache(2)
    cache.get_or_compute("a", lambda: 1)
    cache.get_or_compute("b", lambda: 2)
    assert cache.get_or_compute("a", lambda: -1) == (1, True)
    cache.get_or_compute("c", lambda: 3)
    assert "b" not in cache and "a" in cache and len(cache) == 2


def test_concurrent_requests_compute_once():
    cache = LRUCache(4)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return "embedding"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(hit for _, hit in results) == [False, True, True, True, True]


def test_failed_computation_is_not_cached_and_does_not_block():
    cache = LRUCache(2)
    try:
        cache.get_or_compute("k", lambda: 1 / 0)
    except ZeroDivisionError:
        pass
    assert cache.get_or_compute("k", lambda: 5) == (5, False)


def test_discard_where():
    cache = LRUCache(4)
    for k in ("x1", "x2", "y1"):
        cache.get_or_compute(k, lambda: 0)
    assert cache.discard_where(lambda k: k.startswith("x")) == 2 and len(cache) == 1


def test_caches_are_bounded_in_bytes_as_well_as_entries():
    cache = LRUCache(max_items=100, max_bytes=10 * 2**20)  # 10 MiB
    for k in range(20):
        cache.get_or_compute(k, lambda: torch.zeros(2**20 // 4 * 3))  # 3 MiB each (float32)
    stats = cache.stats()
    assert stats["items"] == 3 and stats["mib"] == 9.0 and stats["evictions"] == 17
    assert 17 in cache and 19 in cache and 16 not in cache  # the least recent went first
    cache.get_or_compute(19, lambda: None)
    assert cache.stats()["hits"] == 1 and cache.stats()["hit_rate"] == round(1 / 21, 3)
    huge, _ = cache.get_or_compute("huge", lambda: torch.zeros(2**20 * 4))  # 16 MiB: above the bound, still kept
    assert len(cache) == 1 and "huge" in cache and cache.bytes == huge.nelement() * 4
    cache.discard_where(lambda k: True)
    assert cache.bytes == 0
