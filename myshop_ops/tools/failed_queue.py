"""Failed messages: the `failed` queue (the truth) and its `failed_messages` index, kept consistent.

The queue cannot be read by id, so acting on some messages walks it once: every message is
fetched unacked and held on one channel (never requeued during the walk, so no message is met
twice and none is skipped, whatever the queue's type), the chosen ones are handled (republished
with a confirm, then acked), and all others are released unacked when the channel closes. Nothing
relies on where they go back: a classic queue restores their order, a quorum queue (on a cluster)
may not, and counts the release as a delivery (``x-delivery-count``; the failed queue has no
delivery limit). Messages are told apart by their failure id or message id, never by position. No
message is ever copied or dropped by a listing.
A retry given a ``broker.Failover`` goes on on another node when its connection is lost: it walks the queue again,
never acking a message before its copy was confirmed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pika.adapters.blocking_connection import BlockingConnection

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import CONNECTION_LOST, H_PUBLISHED_AT, BrokerError, Failover, Publisher, Topology
from myshop_ops.adapters.store import Store
from myshop_ops.core.retry_routing import (
    H_ERROR_CLASS,
    H_ERROR_MESSAGE,
    H_FAILURE_ID,
    H_FIRST_FAILURE,
    H_LAST_FAILURE,
    H_RETRY_COUNT,
    H_WORKER_HOST,
    body_user,
    failure_record_fields,
)
from myshop_ops.tools.failed_record import FailedRecord, UnreadableRecord, kind, read_record, record_key
from myshop_ops.tools.queued import H_FIRST_DEATH_REASON, QueuedMessage, republishable, stored_headers

_DROP_ON_RETRY = ("x-death", "x-first-death-exchange", "x-first-death-queue", H_FIRST_DEATH_REASON,
                  "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", "x-delivery-count",
                  H_RETRY_COUNT, H_ERROR_CLASS, H_ERROR_MESSAGE, H_FIRST_FAILURE, H_LAST_FAILURE, H_WORKER_HOST,
                  H_FAILURE_ID, H_PUBLISHED_AT)  # a retried message's latency counts from its republication
_DURATION = re.compile(r"^(\d{1,12})([smhdw])$")
MAX_DURATION = timedelta(days=36_500)
RELEASE_WAIT_S = 10.0  # a walk waits this long at most for the messages it released to be ready again
Record = FailedRecord | UnreadableRecord


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"'{text}' is not a duration like 30m, 12h or 7d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
    try:
        duration = timedelta(**{unit: int(m.group(1))})
    except OverflowError:
        duration = None
    if duration is None or duration > MAX_DURATION:
        raise ValueError(f"'{text}' is longer than {MAX_DURATION.days} days")
    return duration


@dataclass
class Drift:
    """Where the queue and the collection disagree (after recording what the queue alone held)."""

    queue_count: int
    record_count: int
    recorded_from_queue: list[str] = field(default_factory=list)  # in the queue, had no record: now recorded
    orphan_records: list[str] = field(default_factory=list)  # a record whose message is no longer in the queue

    @property
    def consistent(self) -> bool:
        return not self.recorded_from_queue and not self.orphan_records


@dataclass
class _Walk:
    """Where a retry's walk is, for a failover: a copy being published, the key whose ack may not have landed."""

    in_hand: bool = False  # a copy published and not confirmed yet
    acking: str | None = None  # acked last, no message fetched since (the ack may be lost with the connection)
    spare: str | None = None  # after a failover: the first message of this key is only acked (its copy is confirmed)


@dataclass
class Outcome:
    """What retry/remove did: the keys of the messages (and orphan records) acted on, and the ids asked for that
    named nothing."""

    done: list[str]
    missing: list[str]


class FailedBox:
    """The failed queue on ``connection`` and its records in ``store``; ``failover`` (whose connection it is) lets
    ``retry`` go on on another node when that connection is lost."""

    def __init__(self, connection: BlockingConnection, store: Store, topo: Topology,
                 failover: Failover | None = None):
        self.connection = connection
        self.store = store
        self.topo = topo
        self.failover = failover

    def queue_count(self) -> int:
        """Messages in the failed queue; BrokerError (one line) when it does not exist."""
        depth = broker.queue_depth(self.connection, self.topo.failed_queue)
        if depth is None:
            raise BrokerError(f"the failed queue '{self.topo.failed_queue}' does not exist "
                              "(check RABBITMQ_FAILED_QUEUE, or run `myshop setup-transports`)")
        return depth[0]

    def walk(self, handle: Callable[[QueuedMessage], bool]) -> int:
        """Fetch each message currently in the queue once; ``handle`` returns True to ack it (after doing
        its work), False to leave it. Returns how many were acked, once the queue shows the released ones
        ready again (a quorum queue takes them back some time after the channel's close: a walk right after
        would count too few and miss some), or after RELEASE_WAIT_S."""
        total = self.queue_count()
        ch = self.connection.channel()
        fetched = acked = 0
        for _ in range(total):
            method, props, body = ch.basic_get(self.topo.failed_queue, auto_ack=False)
            if method is None:
                break
            fetched += 1
            if handle(QueuedMessage.read(props, body)):
                ch.basic_ack(method.delivery_tag)
                acked += 1
        ch.close()  # everything not acked goes back to the queue (in order only on a classic queue)
        deadline = time.monotonic() + RELEASE_WAIT_S
        while self.queue_count() < fetched - acked and time.monotonic() < deadline:
            self.connection.sleep(0.05)
        return acked

    def check(self) -> Drift:
        """Compare queue and records id by id (equal counts can hide drift both ways); record queue
        messages that have none (e.g. dead-lettered by the delivery limit after crashing workers) and
        report records whose message is gone. One walk of the queue: O(queue depth) round trips."""
        queue_count = self.queue_count()
        record_count = self.store.count_failures()
        drift = Drift(queue_count, record_count)
        seen: set[str] = set()
        known = {k for r in self.store.failure_keys() if (k := record_key(r)) is not None}  # no text id: no key
        new_records = []

        def look(msg: QueuedMessage) -> bool:
            if msg.key not in known and msg.key not in seen:
                new_records.append(record_from_queue(msg, self.topo))
            seen.add(msg.key)
            return False

        self.walk(look)
        if new_records:
            self.store.record_failures(new_records)
            drift.recorded_from_queue = [str(record_key(r)) for r in new_records]  # ours: a text id each
        drift.orphan_records = sorted(known - seen)
        return drift

    def records(self, *, text: str | None = None, since: timedelta | None = None, limit: int = 50) -> list[Record]:
        """Records newest first (each read or unreadable with why), filtered as ``Store.search_failures``."""
        found = self.store.search_failures(text=text, since=datetime.now(UTC) - since if since else None, limit=limit)
        return [read_record(d) for d in found]

    def matching(self, ident: str) -> list[Record]:
        """The records a failure id or a message id names (a message id: every failed copy of it), newest first."""
        return [read_record(d) for d in self.store.failures_named(ident)]

    def stats(self) -> list[tuple[str, int]]:
        """(error class, records), most first; a class that is not text is counted by its type."""
        counts: dict[str, int] = {}
        for cls, n in self.store.failures_by_class():
            label = cls if isinstance(cls, str) and cls else "?" if cls in (None, "") else f"({kind(cls)})"
            counts[label] = counts.get(label, 0) + n
        return sorted(counts.items(), key=lambda row: -row[1])

    def retry(self, ids: Iterable[str] | None) -> Outcome:
        """Republish the chosen messages (None = all; by failure id or message id) to the main queue with the retry
        count reset, then remove them from the queue and the collection. Returns the keys retried. A connection lost
        mid-walk (with a failover) is replaced and the queue walked again: the message whose copy was confirmed last
        (its ack may have been lost with the connection) is then only acked once; one whose copy was not confirmed is
        published again (counted in ``failover.resent``)."""
        wanted = None if ids is None else set(ids)
        done: list[str] = []
        named: set[str] = set()
        state = _Walk()
        publisher = Publisher(self.connection)

        def resend(msg: QueuedMessage) -> bool:
            state.acking = None  # this message was fetched: the ack before it reached the broker
            if not msg.chosen(wanted):
                return False
            if state.spare == msg.key:  # its copy was confirmed before the failover, its ack lost with it
                state.spare = None
            else:
                headers, _ = republishable(msg.headers, _DROP_ON_RETRY)  # a header pika cannot encode is left out
                state.in_hand = True
                publisher.publish(self.topo.exchange, self.topo.queue, msg.body, message_id=msg.message_id,
                                  headers=headers, content_type=msg.content_type or "application/json")
                state.in_hand = False
                done.append(msg.key)
            named.update({msg.key, msg.message_id})
            state.acking = msg.key
            return True

        while True:
            try:
                self.walk(resend)
                break
            except CONNECTION_LOST as exc:
                if self.failover is None:
                    raise
                self.failover.resent += state.in_hand
                state.in_hand, state.spare, state.acking = False, state.acking, None
                self.connection = self.failover.recover(exc)
                publisher = Publisher(self.connection)
        publisher.channel.close()
        self._forget(done)
        return Outcome(done, [] if wanted is None else sorted(wanted - named))

    def remove(self, ids: Iterable[str] | None) -> Outcome:
        """Delete the chosen messages (None = all; by failure id or message id) from the queue and the collection.
        Records whose message is no longer in the queue are removed too. Returns the keys removed."""
        wanted = None if ids is None else set(ids)
        done: list[str] = []
        named: set[str] = set()

        def drop(msg: QueuedMessage) -> bool:
            if not msg.chosen(wanted):
                return False
            done.append(msg.key)
            named.update({msg.key, msg.message_id})
            return True

        self.walk(drop)
        if wanted is None:
            self.store.delete_failures()
            return Outcome(done, [])
        found = {ident: self.matching(ident) for ident in sorted(wanted - named)}
        orphans = [(r.key or ident, r) for ident, recs in found.items() for r in recs if r.key not in done]
        self.store.delete_failure_docs(r.doc_id for _, r in orphans if r.doc_id is not None)  # readable or not
        self._forget([*done, *(k for k, r in orphans if r.doc_id is None)])
        named.update(ident for ident, recs in found.items() if recs)
        return Outcome(done + list(dict.fromkeys(k for k, _ in orphans)), sorted(wanted - named))

    def erase_user(self, user_id: str) -> tuple[int, int]:
        """Erasure: remove every failed message of ``user_id`` from the queue and every record of it from the
        collection. Returns (messages removed, records removed)."""
        exists = broker.queue_depth(self.connection, self.topo.failed_queue) is not None
        removed = self.walk(lambda msg: body_user(msg.body) == user_id) if exists else 0
        return removed, self.store.delete_user_failures(user_id)

    def purge(self) -> tuple[int, int]:
        """Empty the failed queue, then delete the records of failures that happened before the purge began
        (a message failing meanwhile keeps both). Returns (messages purged, records deleted)."""
        started = datetime.now(UTC)
        purged = broker.purge(self.connection, self.topo.failed_queue)
        deleted = self.store.delete_failures_before(started)
        return purged, deleted

    def _forget(self, keys: list[str]) -> None:
        if keys:
            self.store.delete_failures(keys)


def record_from_queue(msg: QueuedMessage, topo: Topology) -> dict:
    """A failed_messages record for a queue message that has none (dead-lettered by the broker, or a failed copy
    whose record was removed): from the message's parsed fields only."""
    reason = msg.death_reason
    error_class = msg.error_class or ("DeliveryLimitExceeded" if reason == "delivery_limit" else "DeadLettered")
    message = msg.error_message or f"dead-lettered by RabbitMQ ({reason or 'unknown reason'})" + (
        ": the message was redelivered too often, probably because processing it killed the worker"
        if reason == "delivery_limit" else "")
    now = datetime.now(UTC)
    return failure_record_fields(
        **({"failure_id": msg.failure_id} if msg.failure_id else {}),  # absent, never null: the index is sparse
        message_id=msg.message_id,
        body=msg.body,
        headers=stored_headers(msg.headers),
        error_class=error_class,
        error_message=message,
        retry_count=msg.retry_count or 0,
        first_failure_at=now,
        last_failure_at=now,
        worker_host=msg.worker_host or "",
        original_queue=msg.original_queue or topo.queue,
    )
