"""What the worker core needs from the outside world, as typed protocols.

The real adapters satisfy them (store.Store, dedup.RedisState, embeddings.PhraseEmbedder, pika's BlockingConnection
and channel); so do the in-memory stand-ins of tests/support/stubs.py that the unit tests run the core against.
Typing only: nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from datetime import datetime

    import numpy as np
    from bson.objectid import ObjectId

    from myshop_ops.adapters.dedup import Claimed
    from myshop_ops.adapters.embeddings import EmbeddingError
    from myshop_ops.adapters.store import ProfileWrite, StoredProfile, WriteResult


class ProfileStore(Protocol):
    """MongoDB as the core uses it: profiles, product vectors, failed-message records, erasure records."""

    def ping(self) -> None: ...

    def missing_indexes(self) -> list[tuple[str, str]]: ...

    def load_profiles(self, user_ids: Iterable[str], model: str, dimensions: int
                      ) -> tuple[dict[str, StoredProfile], dict[str, ValueError]]: ...

    def write_profiles(self, writes: Sequence[ProfileWrite], layout: str = "shop") -> WriteResult: ...

    def product_vectors(self, product_ids: Iterable[str], model: str, dimensions: int
                        ) -> tuple[dict[str, np.ndarray], dict[str, str]]: ...

    def record_failures(self, records: Sequence[dict]) -> None: ...

    def erasure_times(self, user_ids: Iterable[str]) -> tuple[dict[str, datetime], dict[str, ValueError]]: ...

    def delete_profile_doc(self, user_id: str, doc_id: ObjectId) -> bool: ...

    def migration(self) -> dict | None: ...

    def view(self, suffix: str) -> ProfileStore: ...


class EventState(Protocol):
    """Redis as the core uses it: processed event keys, the poison journal, the stop-workers flag, per-user claims.
    Never raises once the worker runs (a miss when Redis is down; no claims: None), except ``ping``."""

    def ping(self) -> None: ...

    def seen(self, keys: Sequence[str]) -> set[str]: ...

    def mark(self, event_keys: Iterable[str]) -> None: ...

    def attempts(self, message_ids: Sequence[str]) -> list[int] | None: ...

    def count_attempts(self, message_ids: Sequence[str], ttl: int = 86400) -> None: ...

    def attempts_done(self, message_ids: Sequence[str]) -> None: ...

    def stop_requested(self, started_at: float) -> bool: ...

    def claim(self, user_ids: Sequence[str], token: str, ttl_ms: int, model: str, dimensions: int
              ) -> Claimed | None: ...

    def release(self, user_ids: Sequence[str], token: str,
                profiles: Mapping[str, StoredProfile] | None = None) -> None: ...


class Phrases(Protocol):
    """Search-phrase vectors by phrase: for each distinct phrase its vector, or the embeddings.EmbeddingError that says
    why it has none (transient or not); never raises it."""

    def embed(self, phrases: Sequence[str]) -> dict[str, np.ndarray | EmbeddingError]: ...


class Channel(Protocol):
    """The consuming channel: QoS, the consumer callback, acks."""

    def basic_qos(self, prefetch_count: int = 0) -> None: ...

    def basic_consume(self, queue: str, on_message_callback: Callable) -> str: ...

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None: ...

    def close(self) -> None: ...


class Connection(Protocol):
    """A broker connection the worker drives from its main thread (broker.Publisher opens its channels on it)."""

    is_open: bool

    def channel(self) -> Channel: ...

    def process_data_events(self, time_limit: float | None = 0) -> None: ...

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None: ...

    def sleep(self, duration: float) -> None: ...

    def close(self) -> None: ...
