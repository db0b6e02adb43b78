"""In-memory stand-ins for what the worker core talks to (myshop_ops/core/ports.py): a broker with queues,
connections and channels that record publishes and acks, the MongoDB store, the Redis state and an embeddings provider.

Small and literal on purpose: each keeps what a test asserts on (``published``, ``acks``, ``records``, ...) and has
one switch per fault a test injects (``fail_*``). The real-service suites (tests/integration, tests/reliability)
exercise the real adapters; these let the core's own decisions be tested in milliseconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pika
import pika.exceptions as pex

from myshop_ops.adapters.dedup import Claimed, claim_reply, pack_profile
from myshop_ops.adapters.embeddings import EmbeddingError, HashProvider, InputRefused
from myshop_ops.adapters.store import TOKEN_BYTES, ProfileWrite, StoredProfile, WriteResult, written

# ---- the broker ---------------------------------------------------------------------------------------------------

@dataclass
class Message:
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool = False


@dataclass
class StubBroker:
    """Queues by name. Publishing to the default exchange ("") routes by routing key to the queue of that name, to
    another exchange through ``bindings`` (exchange -> queue); no queue: unroutable, as a mandatory publish is."""

    queues: dict[str, deque[Message]] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)
    connections: list[StubConnection] = field(default_factory=list)

    def declare(self, *queues: str) -> StubBroker:
        for q in queues:
            self.queues.setdefault(q, deque())
        return self

    def publish(self, queue: str, body: bytes, *, message_id: str | None = None, headers: dict | None = None,
                redelivered: bool = False, properties: pika.BasicProperties | None = None) -> None:
        """What a producer would publish straight to ``queue``; ``properties``, when given, are delivered as they
        are (any values: what pika decodes from a hostile publisher, or stranger)."""
        props = properties or pika.BasicProperties(message_id=message_id, headers=headers,
                                                   content_type="application/json")
        self.queues[queue].append(Message(body, props, redelivered))

    def route(self, exchange: str, routing_key: str) -> deque[Message]:
        queue = routing_key if exchange == "" else self.bindings.get(exchange)
        if queue not in self.queues:
            raise pex.UnroutableError([])
        return self.queues[queue]

    def bodies(self, queue: str) -> list[bytes]:
        return [m.body for m in self.queues[queue]]

    def connect(self) -> StubConnection:
        conn = StubConnection(self)
        self.connections.append(conn)
        return conn


class StubChannel:
    """A channel: publishes (confirmed at once) and, once consuming, deliveries up to the prefetch; records acks."""

    def __init__(self, conn: StubConnection, number: int):
        self.conn, self.number, self.is_open = conn, number, True
        self.prefetch = 0
        self.consumer: tuple[str, Callable] | None = None
        self.unacked: dict[int, Message] = {}  # by delivery tag, in delivery order
        self.acks: list[tuple[int, bool]] = []  # (delivery tag, multiple)
        self.published: list[tuple[str, str, bytes, pika.BasicProperties]] = []
        self._tags = 0

    def confirm_delivery(self) -> None:
        pass

    def basic_qos(self, prefetch_count: int = 0) -> None:
        self.prefetch = prefetch_count

    def basic_consume(self, queue: str, on_message_callback: Callable) -> str:
        self.consumer = (queue, on_message_callback)
        return f"ctag-{self.number}"

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties,
                      mandatory: bool = False) -> None:
        if self.conn.fail_publish is not None:
            raise self.conn.fail_publish
        target = self.conn.broker.route(exchange, routing_key)
        self.published.append((exchange, routing_key, body, properties))
        target.append(Message(body, properties))

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        if self.conn.fail_ack is not None:
            raise self.conn.fail_ack
        self.acks.append((delivery_tag, multiple))
        for tag in [t for t in self.unacked if t == delivery_tag or (multiple and t <= delivery_tag)]:
            del self.unacked[tag]

    def deliver(self) -> int:
        """Hand ready messages to the consumer, up to the prefetch; returns how many."""
        if self.consumer is None or not self.is_open:
            return 0
        queue, callback = self.consumer
        ready = self.conn.broker.queues[queue]
        n = 0
        while ready and (not self.prefetch or len(self.unacked) < self.prefetch):
            message = ready.popleft()
            self._tags += 1
            self.unacked[self._tags] = message
            method = pika.spec.Basic.Deliver(delivery_tag=self._tags, redelivered=message.redelivered)
            callback(self, method, message.properties, message.body)
            n += 1
        return n

    def close(self) -> None:
        """Unacked deliveries go back to the front of their queue, marked redelivered (as RabbitMQ does)."""
        if not self.is_open:
            return
        self.is_open = False
        if self.consumer is not None and self.unacked:
            queue = self.conn.broker.queues[self.consumer[0]]
            for message in reversed(self.unacked.values()):
                queue.appendleft(Message(message.body, message.properties, redelivered=True))
            self.unacked.clear()


class StubConnection:
    """A connection to the StubBroker; ``process_data_events`` delivers to its consuming channels."""

    def __init__(self, broker: StubBroker):
        self.broker = broker
        self.is_open = True
        self.channels: list[StubChannel] = []
        self.fail_publish: Exception | None = None  # raised by every basic_publish while set
        self.fail_ack: Exception | None = None  # raised by every basic_ack while set
        self._woken = threading.Event()

    def channel(self) -> StubChannel:
        ch = StubChannel(self, len(self.channels) + 1)
        self.channels.append(ch)
        return ch

    @property
    def consumer(self) -> StubChannel:
        return next(ch for ch in self.channels if ch.consumer is not None)

    def process_data_events(self, time_limit: float | None = 0) -> None:
        if not self.is_open:
            raise pex.StreamLostError("connection closed")
        if sum(ch.deliver() for ch in self.channels) == 0 and time_limit:
            self._woken.wait(min(time_limit, 0.005))  # a short wait: the tests need no real idle time
            self._woken.clear()

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        self._woken.set()

    def sleep(self, duration: float) -> None:
        pass

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.is_open = False


# ---- MongoDB ------------------------------------------------------------------------------------------------------

class StubStore:
    """Profiles, product vectors and failed-message records in dicts; writes are conditional on the version read, as
    the real store's are (a write whose base is stale, or an insert of a user that exists, conflicts)."""

    def __init__(self, products: dict[str, np.ndarray] | None = None):
        self.profiles: dict[str, StoredProfile] = {}
        self.products: dict[str, np.ndarray] = dict(products or {})
        self.foreign: dict[str, str] = {}  # product id -> what its unusable vector is
        self.unreadable: dict[str, ValueError] = {}  # user id -> why its document cannot be folded into
        self.records: list[dict] = []
        self.erasures: dict[str, datetime] = {}  # user id -> erasure time (the real store keys it by a hash)
        self.last_writes: dict[str, ProfileWrite] = {}  # user id -> the last write applied (its event fields)
        self.reads = self.writes = 0
        self.fail_reads: Exception | None = None  # raised by load_profiles and product_vectors while set
        self.fail_writes: Exception | None = None  # raised by write_profiles while set
        self.fail_records: Exception | None = None  # raised by record_failures while set

    def ping(self) -> None:
        if self.fail_reads is not None:
            raise self.fail_reads

    def missing_indexes(self) -> list[tuple[str, str]]:
        return []

    def migration(self) -> dict | None:
        return None  # no model migration (tests/integration/test_model_migration.py runs one on MongoDB)

    def view(self, suffix: str) -> StubStore:
        return self  # never asked for: there is no migration

    def load_profiles(self, user_ids: Iterable[str], model: str, dimensions: int
                      ) -> tuple[dict[str, StoredProfile], dict[str, ValueError]]:
        if self.fail_reads is not None:
            raise self.fail_reads
        self.reads += 1
        ids = list(user_ids)
        return ({u: self.profiles[u] for u in ids if u in self.profiles and u not in self.unreadable},
                {u: self.unreadable[u] for u in ids if u in self.unreadable})

    def write_profiles(self, writes: Sequence[ProfileWrite], layout: str = "shop") -> WriteResult:
        if self.fail_writes is not None:
            raise self.fail_writes
        self.writes += 1
        result = WriteResult()
        for w in writes:
            current = self.profiles.get(w.user_id)
            if (current is None) != (w.base is None) or (current and current.version != w.base.version):
                result.conflicted.append(w.user_id)
                continue
            self.profiles[w.user_id] = result.stored[w.user_id] = written(w, os.urandom(TOKEN_BYTES))
            self.last_writes[w.user_id] = w
            result.applied.append(w.user_id)
        return result

    def product_vectors(self, product_ids: Iterable[str], model: str, dimensions: int
                        ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        if self.fail_reads is not None:
            raise self.fail_reads
        ids = set(product_ids)
        return ({p: v for p, v in self.products.items() if p in ids},
                {p: why for p, why in self.foreign.items() if p in ids})

    def record_failures(self, records: Sequence[dict]) -> None:
        if self.fail_records is not None:
            raise self.fail_records
        self.records += records

    def erasure_times(self, user_ids: Iterable[str]) -> tuple[dict[str, datetime], dict[str, ValueError]]:
        if self.fail_reads is not None:
            raise self.fail_reads
        return {u: self.erasures[u] for u in user_ids if u in self.erasures}, {}

    def delete_profile_doc(self, user_id: str, doc_id: object) -> bool:
        current = self.profiles.get(user_id)
        if current is None or current.doc_id != doc_id:
            return False
        del self.profiles[user_id]
        return True

    def erase(self, user_id: str, at: datetime) -> None:
        """What `myshop user delete` does here: the erasure record first, then the profile goes."""
        self.erasures[user_id] = max(at, self.erasures.get(user_id, at))
        self.profiles.pop(user_id, None)


# ---- Redis --------------------------------------------------------------------------------------------------------

class StubRedis:
    """Processed event keys, the poison journal, the stop flag and the per-user claims; ``down`` makes every call
    degrade as the real RedisState does (nothing seen, attempts unknown, nothing recorded, no claims)."""

    def __init__(self):
        self.processed: set[str] = set()
        self.journal: dict[str, int] = {}
        self.stop_at: float | None = None
        self.vectors: dict[str, bytes] = {}  # the phrase cache, by key
        self.claims: dict[str, tuple[str, float]] = {}  # user -> (holder's token or "free:" + last holder's, expiry)
        self.claim_waits: dict[str, tuple[str, float]] = {}  # user -> (the worker waiting for it, expiry)
        self.handoffs: dict[str, bytes] = {}  # user -> the profile its last holder left for the waiter
        self.clock = time.monotonic
        self.down = False

    def ping(self) -> None:
        if self.down:
            raise ConnectionError("redis down")

    def seen(self, keys: Sequence[str]) -> set[str]:
        return set() if self.down else {k for k in keys if k in self.processed}

    def mark(self, event_keys: Iterable[str]) -> None:
        if not self.down:
            self.processed.update(event_keys)

    def attempts(self, message_ids: Sequence[str]) -> list[int] | None:
        return None if self.down else [self.journal.get(_journal_id(m), 0) for m in message_ids]

    def count_attempts(self, message_ids: Sequence[str], ttl: int = 86400) -> None:
        if not self.down:
            for m in map(_journal_id, message_ids):
                self.journal[m] = self.journal.get(m, 0) + 1

    def attempts_done(self, message_ids: Sequence[str]) -> None:
        if not self.down:
            for m in map(_journal_id, message_ids):
                self.journal.pop(m, None)

    def stop_requested(self, started_at: float) -> bool:
        return not self.down and self.stop_at is not None and self.stop_at >= started_at

    # per-user claims, as dedup.RedisState's scripts keep them: user -> (value, expiry on ``clock``)
    def _live(self, table: dict[str, tuple[str, float]], user: str) -> str | None:
        value = table.get(user)
        return value[0] if value is not None and value[1] > self.clock() else None

    def claim(self, user_ids: Sequence[str], token: str, ttl_ms: int, model: str, dimensions: int
              ) -> Claimed | None:
        if self.down:
            return None
        codes, handoffs, until = [], [], self.clock() + ttl_ms / 1000
        for user in user_ids:
            held, waiter = self._live(self.claims, user), self._live(self.claim_waits, user)
            free = held is None or held.startswith("free:")
            handoffs.append(b"")
            if held == token or (free and waiter in (None, token)):
                self.claims[user] = (token, until)
                if waiter == token:
                    del self.claim_waits[user]
                codes.append(2 if held in (token, "free:" + token) else 1)
                if codes[-1] == 1:
                    handoffs[-1] = self.handoffs.pop(user, b"")
            else:
                if waiter in (None, token):
                    self.claim_waits[user] = (token, until)
                codes.append(0)
        return claim_reply([codes, handoffs], user_ids, model, dimensions)

    def release(self, user_ids: Sequence[str], token: str, profiles: Mapping[str, StoredProfile] | None = None
                ) -> None:
        if not self.down:
            for user in user_ids:
                if self._live(self.claims, user) == token:
                    self.claims[user] = ("free:" + token, self.clock() + 600)
                    blob = pack_profile(profiles[user]) if profiles and user in profiles else b""
                    if blob and self._live(self.claim_waits, user) is not None:
                        self.handoffs[user] = blob

    # the phrase cache (embeddings.VectorCache), kept in memory too
    def get_vectors(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None if self.down else self.vectors.get(k) for k in keys]

    def set_vectors(self, items: dict[str, bytes], ttl: int) -> None:
        if not self.down:
            self.vectors.update(items)


def _journal_id(message_id: str) -> str:
    """A journal entry's id, checked as RedisState's key building (prefix + id) checks it: only text."""
    if not isinstance(message_id, str):
        raise TypeError(f'can only concatenate str (not "{type(message_id).__name__}") to str')
    return message_id


# ---- the embeddings provider --------------------------------------------------------------------------------------

class StubProvider(HashProvider):
    """The hash provider (deterministic vectors, no network), recording each request's texts. ``fail`` makes every
    request raise; ``replies`` answers per input text (as sent: a normalised phrase): a value there is that input's
    vector as received (anything: NaN, huge, short, ...); an InputRefused is that input's row (a reply without a
    usable entry for it, the others answered); any other EmbeddingError is raised for every request holding it (a
    RequestRefused: the provider refuses that input's whole request; a transient one: 429, 503, a timeout)."""

    def __init__(self, dimensions: int, model: str = "hash-v1"):
        super().__init__(dimensions, model)
        self.calls: list[list[str]] = []
        self.fail: EmbeddingError | None = None
        self.replies: dict[str, object] = {}

    def embed_request(self, texts: Sequence[str]) -> list[np.ndarray | EmbeddingError]:
        if self.fail is not None:
            raise self.fail
        self.calls.append(list(texts))
        refusals = [r for t in texts
                    if isinstance(r := self.replies.get(t), EmbeddingError) and not isinstance(r, InputRefused)]
        if refusals:
            raise refusals[0]
        hashed = super().embed_request(texts)
        return [self.replies.get(t, row) for t, row in zip(texts, hashed, strict=True)]


# ---- the worker's other collaborators -----------------------------------------------------------------------------

class StubNotifier:
    """sd_notify as a list of what was sent."""

    def __init__(self):
        self.sent: list[str] = []

    def ready(self, status: str) -> None:
        self.sent.append(f"READY {status}")

    def status(self, status: str) -> None:
        self.sent.append(status)

    def watchdog(self) -> None:
        pass

    def stopping(self, status: str) -> None:
        self.sent.append(f"STOPPING {status}")
