"""The LRU cache: bounded, and one computation per key even under concurrent requests."""

import threading
import time

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
