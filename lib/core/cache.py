"""Bounded, thread-safe caches for loaded images and image embeddings.

MONAI Label may run inference from a thread pool and several clients may click at once, so the caches lock
their bookkeeping, and a value that is being computed for one request is awaited, not recomputed, by another
request that needs the same key (two fast clicks on a fresh slice encode it once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable

import numpy as np
import torch
from lib.core.errors import RequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingKey:
    """What an image embedding was computed from. Every cache of embeddings (and the click memory built on them)
    is keyed by one, so an image whose file changed can drop exactly its entries (`image` is its fingerprint)."""

    image: Hashable  # the image's fingerprint (path, mtime, size), or any id for images that are not files
    intensity: Hashable = None  # how intensities were mapped to [0, 1]: LoadedImage.intensity's key
    axis: int | None = None  # None: a 2D image
    index: int | None = None
    encoder: tuple = ("model",)  # whose encoder: the frozen model, or e.g. ("msa", label, stamp, "depth", 3)
    window: tuple | None = None  # the part of the slice that was encoded (Window.as_tuple())

    @property
    def path(self):
        """The image's file (the fingerprint's first element)."""
        return self.image[0] if isinstance(self.image, tuple) else self.image

    def at(self, window) -> "EmbeddingKey":
        return replace(self, window=window.as_tuple())

    def of_other_version(self, fingerprint: tuple) -> bool:
        """Whether this key is of the same file as `fingerprint`, but of its content before a change."""
        return self.path == fingerprint[0] and self.image != fingerprint


def nbytes(value) -> int:
    """Memory held by a cached value: its tensors and arrays (in containers, or a LoadedImage's array)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    array = getattr(value, "array", None)  # a LoadedImage
    return nbytes(array) if array is not None else 0


class LRUCache:
    """Least-recently-used cache holding at most `max_items` values and, when `max_bytes` is set, at most that much
    memory (a cache of 4 CT volumes can be 4 GB): the least recent values go first, the newest always stays."""

    def __init__(self, max_items: int, max_bytes: int | None = None):
        if max_items < 1:
            raise ValueError(f"cache size must be at least 1, got {max_items}")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._bytes = 0
        self._pending: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            lookups = self.hits + self.misses
            return {"items": len(self._items), "max_items": self.max_items, "mib": round(self._bytes / 2**20, 1),
                    "max_mib": None if self.max_bytes is None else round(self.max_bytes / 2**20, 1),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "hit_rate": round(self.hits / lookups, 3) if lookups else None}

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """The cached value for `key` and True, or `compute()`'s value (now cached) and False."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key], True
                pending = self._pending.get(key)
                if pending is None:
                    pending = self._pending[key] = threading.Event()
                    self.misses += 1
                    break
            pending.wait()  # another request is computing it; then look again (it may have failed)
        try:
            value = compute()
            size = nbytes(value)
            with self._lock:
                self._items[key] = value
                self._sizes[key] = size
                self._bytes += size
                self._items.move_to_end(key)
                while len(self._items) > 1 and (len(self._items) > self.max_items or (
                        self.max_bytes is not None and self._bytes > self.max_bytes)):
                    self._drop(next(iter(self._items)))
                    self.evictions += 1
            return value, False
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def _drop(self, key: Hashable) -> None:
        del self._items[key]
        self._bytes -= self._sizes.pop(key)

    def discard_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key matches; returns how many were dropped."""
        with self._lock:
            stale = [k for k in self._items if predicate(k)]
            for k in stale:
                self._drop(k)
            return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self._bytes = 0


class LazyModel:
    """A model built on first use, once, thread-safely: the app starts without loading weights (MONAI Label also
    rebuilds the app in its training subprocess), and a failure to load (missing or corrupt weights) is a 503
    that names the cause and is retried at the next request."""

    def __init__(self, factory: Callable[[Any], Any], device, what: str = "model"):
        self.factory, self.device, self.what = factory, device, what
        self._model = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._model is None:
                start = time.perf_counter()
                try:
                    self._model = self.factory(self.device).eval()
                except RequestError:
                    raise
                except Exception as e:
                    logger.exception(f"{self.what} could not be loaded")
                    raise RequestError(503, f"the {self.what} could not be loaded: {e}") from e
                logger.info(f"Loaded {type(self._model).__name__} on {self.device} in "
                            f"{time.perf_counter() - start:.1f}s")
            return self._model
