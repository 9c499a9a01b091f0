"""A bounded LRU cache keyed by statement digest, with hit/miss counters.

Bounded because digests come from clients: an unbounded map keyed by client text is a memory
leak an attacker can drive. ``dict`` keeps insertion order, so the LRU is a plain dict where a
hit moves its key to the end (pop and re-insert) and an insert past the bound drops the first
key. No lock: the proxy runs on one event loop thread.
"""

from __future__ import annotations

from typing import Generic, TypeVar

V = TypeVar("V")


class DigestCache(Generic[V]):
    """Least-recently-used map from digest to classification."""

    __slots__ = ("_data", "hits", "maxsize", "misses")

    def __init__(self, maxsize: int = 4096) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._data: dict[str, V] = {}

    def get(self, key: str) -> V | None:
        data = self._data
        value = data.pop(key, None)
        if value is None:
            self.misses += 1
            return None
        data[key] = value  # re-insert: now the most recently used
        self.hits += 1
        return value

    def put(self, key: str, value: V) -> None:
        if self.maxsize == 0:
            return
        data = self._data
        data.pop(key, None)
        data[key] = value
        if len(data) > self.maxsize:
            del data[next(iter(data))]

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
