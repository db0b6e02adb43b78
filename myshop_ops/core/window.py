"""The per-user batching window (EMBEDDING_BATCH_ENABLED): hold a user's deliveries until the user has been quiet
for ``window`` seconds, then release them together so a burst of events costs one profile write.

Pure bookkeeping, no I/O: the worker holds deliveries (unacked) here and processes what ``release`` returns. A
user is released when quiet for ``window`` s (sliding), at the latest ``cap`` s after its first held event, and,
oldest first, whenever more than ``max_held`` deliveries are held (the prefetch must never fill up with held
messages, or the broker would stop delivering and nothing would ever become due).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from myshop_ops.base.contract import loose_field

T = TypeVar("T")
CAP_FACTOR = 4  # a user that never goes quiet is still written every CAP_FACTOR * window seconds


@dataclass
class _Held(Generic[T]):
    first: float
    last: float
    items: list[T] = field(default_factory=list)


class BatchWindow(Generic[T]):
    def __init__(self, window: float, max_held: int, cap: float | None = None):
        self.window = window
        self.cap = cap if cap is not None else CAP_FACTOR * window
        self.max_held = max_held
        self._users: dict[str, _Held[T]] = {}  # insertion order = order of first held event
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def hold(self, user_id: str, item: T, now: float) -> None:
        held = self._users.get(user_id)
        if held is None:
            held = self._users[user_id] = _Held(now, now)
        held.last = now
        held.items.append(item)
        self._count += 1

    def _due(self, held: _Held[T], now: float) -> bool:
        return now - held.last >= self.window or now - held.first >= self.cap

    def release(self, now: float) -> list[T]:
        """Everything of the users that are due, plus the oldest users while more than max_held are held."""
        out: list[T] = []
        for user_id in [u for u, h in self._users.items() if self._due(h, now)]:
            out += self._pop(user_id)
        while self._count > self.max_held:
            out += self._pop(next(iter(self._users)))
        return out

    def release_all(self) -> list[T]:
        out: list[T] = []
        while self._users:
            out += self._pop(next(iter(self._users)))
        return out

    def next_due(self, now: float) -> float | None:
        """Seconds until the next user is due (0 if one is already), None when nothing is held."""
        if not self._users:
            return None
        return max(0.0, min(min(h.last + self.window, h.first + self.cap) for h in self._users.values()) - now)

    def _pop(self, user_id: str) -> list[T]:
        held = self._users.pop(user_id)
        self._count -= len(held.items)
        return held.items


def user_of(body: bytes) -> str | None:
    """The user id of a message body, cheaply (None when the body is not an event: it is processed at once and
    the pipeline reports why)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    user = loose_field(doc, "user_id", "userId")
    return str(user) if isinstance(user, str | int) and not isinstance(user, bool) else None
