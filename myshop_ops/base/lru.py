"""`Recent`, the one in-process LRU cache: the worker's profiles and product vectors (pipeline.py) and the phrase
vectors in front of the shared cache (embeddings.PhraseEmbedder)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A bounded LRU of values by key; with ``ttl``, a value put more than ``ttl`` seconds ago is a miss."""

    def __init__(self, size: int, ttl: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl, self.clock = size, ttl, clock
        self._items: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def take(self, keys: Iterable[K]) -> tuple[dict[K, V], list[K]]:
        """(the values held, the keys to look up elsewhere)."""
        hits: dict[K, V] = {}
        misses: list[K] = []
        oldest = -math.inf if self.ttl is None else self.clock() - self.ttl
        for key in keys:
            found = self._items.get(key)
            if found is None or found[1] < oldest:
                misses.append(key)
            else:
                self._items.move_to_end(key)
                hits[key] = found[0]
        return hits, misses

    def put(self, items: dict[K, V]) -> None:
        now = self.clock()
        for key, value in items.items():
            self._items[key] = (value, now)
            self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def drop(self, keys: Iterable[K]) -> None:
        for key in keys:
            self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
