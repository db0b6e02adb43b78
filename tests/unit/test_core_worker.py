"""The worker core against in-memory stand-ins (tests/support/stubs.py): the consume loop end to end, settlement
(ack, retry copy, failed copy, a crash before the ack), the poison journal, limits and the batching window. The same
behaviours against real services: tests/integration and tests/reliability."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import numpy as np
import pika
import pytest
from pymongo.errors import AutoReconnect

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Publisher, Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import EmbeddingError, PhraseEmbedder
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.core.limits import Limits
from myshop_ops.core.pipeline import BatchResult, Item, Status
from myshop_ops.core.retry_routing import H_ERROR_CLASS, H_FAILURE_ID, H_RETRY_COUNT
from myshop_ops.core.settlement import settle
from myshop_ops.core.worker import SOLO_ATTEMPTS, Delivery, Worker
from tests.support.stubs import StubBroker, StubNotifier, StubProvider, StubRedis, StubStore

# the core's stand-in suite runs in seconds: a change that makes the loop hang fails here in 30 s, not 300
pytestmark = pytest.mark.timeout(30)


DIMS = 16
SETTINGS = Settings(embedding_provider="hash", embedding_dimensions=DIMS, max_retries=2)
TOPO = Topology.from_settings(SETTINGS)
T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
    return v / np.linalg.norm(v)


def event(user: str, ref: str = "p1", hour: int = 0, kind: str = "product_view"):
    return make_event(user, kind, ref, T0.replace(hour=hour))


class Shop:
    """A worker wired to stand-ins, and the broker it consumes from."""

    def __init__(self, settings: Settings = SETTINGS, limits: Limits | None = None, prefetch: int = 200,
                 store: StubStore | None = None, redis: StubRedis | None = None):
        """``store`` and ``redis``: shared with another Shop's worker (two workers of one deployment)."""
        self.broker = StubBroker(bindings={TOPO.failed_exchange: TOPO.failed_queue})
        self.broker.declare(TOPO.queue, TOPO.failed_queue, *(TOPO.retry_queue(n) for n in (1, 2)))
        self.store = store or StubStore({"p1": unit(1), "p2": unit(2)})
        self.redis = redis or StubRedis()
        self.provider = StubProvider(DIMS, settings.model)
        self.notifier = StubNotifier()
        self.worker = Worker(settings, limits=limits or Limits(), prefetch=prefetch, store=self.store,
                             redis=self.redis, phrases=PhraseEmbedder(self.provider, None, ttl=60),
                             notifier=self.notifier, connect=self.broker.connect)

    def send(self, *bodies: bytes, redelivered: bool = False) -> None:
        for body in bodies:
            self.broker.publish(TOPO.queue, body, redelivered=redelivered)

    def attach(self):
        """The worker's connection and publisher, as ``_consume`` sets them up, and a consuming channel."""
        conn = self.worker._connection = self.broker.connect()
        self.worker._publisher = Publisher(conn)
        channel = conn.channel()
        return channel

    def delivery(self, tag: int, body: bytes, *, message_id: str | None = None, headers: dict | None = None,
                 redelivered: bool = False, attempts: int | None = None) -> Delivery:
        props = pika.BasicProperties(message_id=message_id, headers=headers, content_type="application/json")
        delivery = Delivery.arrived(tag, body, props, redelivered)
        delivery.attempts = attempts
        return delivery


# ---- the loop end to end ------------------------------------------------------------------------------------------

def test_the_worker_consumes_applies_fails_and_acks_everything_then_stops_at_its_limit():
    shop = Shop(limits=Limits(messages=6))
    good = [event("u1", "p1", 1), event("u1", "p2", 2), event("u2", "p1"), event("u3", "p404")]
    shop.send(*map(serialise, good), serialise(good[0]), b'{"user_id": "u9"}')
    started = time.monotonic()
    assert shop.worker.run() == 0
    assert time.monotonic() - started < 5
    t = shop.worker.totals
    assert (t.applied, t.duplicate, t.skipped, t.failed, t.retried, t.batches) == (3, 1, 1, 1, 0, 1)
    assert shop.worker.limits.reason == "message limit 6 reached"
    assert not shop.broker.queues[TOPO.queue] and shop.broker.connections[0].consumer.acks == [(6, True)]
    [failed] = shop.broker.queues[TOPO.failed_queue]
    assert failed.body == b'{"user_id": "u9"}' and failed.properties.headers[H_ERROR_CLASS] == "InvalidMessage"
    [record] = shop.store.records
    assert record["failure_id"] == failed.properties.headers[H_FAILURE_ID] and record["user_id"] == "u9"
    assert shop.store.profiles["u1"].event_count == 2 and shop.store.profiles["u1"].version == 1
    assert "READY consuming user_embedding_updates" in shop.notifier.sent


def test_stop_workers_ends_the_loop_with_nothing_lost():
    shop = Shop()
    shop.redis.stop_at = time.time() + 1  # stop-workers run after this worker started
    shop.send(serialise(event("u1")))
    assert shop.worker.run() == 0 and shop.worker.limits.reason == "stop-workers requested"
    assert len(shop.broker.queues[TOPO.queue]) == 1  # never taken, or back in the queue unacked


def test_a_message_limit_smaller_than_the_queue_takes_exactly_that_many():
    shop = Shop(limits=Limits(messages=3))
    shop.send(*(serialise(event(f"u{i}")) for i in range(5)))
    assert shop.worker.run() == 0
    assert shop.worker.totals.applied == 3 and len(shop.store.profiles) == 3
    assert len(shop.broker.queues[TOPO.queue]) == 2 and all(m.redelivered for m in shop.broker.queues[TOPO.queue])


def test_the_batching_window_holds_a_user_until_quiet_then_writes_once_and_acks_each():
    settings = Settings(embedding_provider="hash", embedding_dimensions=DIMS, batch_enabled=True, batch_window=0.05)
    shop = Shop(settings, limits=Limits(messages=5))
    shop.send(*(serialise(event("u1", "p1", h)) for h in range(3)), *(serialise(event("u2", "p2", h)) for h in (4, 5)))
    assert shop.worker.run() == 0
    assert shop.store.profiles["u1"].version == 1 and shop.store.profiles["u1"].event_count == 3  # one write
    assert shop.store.profiles["u2"].version == 1 and shop.store.profiles["u2"].event_count == 2
    assert sorted(shop.broker.connections[0].consumer.acks) == [(tag, False) for tag in range(1, 6)]


# ---- settlement ---------------------------------------------------------------------------------------------------

def outcomes(shop: Shop, *statuses: Status) -> tuple[list[Delivery], BatchResult]:
    events = [event(f"u{i}") for i in range(len(statuses))]
    batch = [shop.delivery(i + 1, serialise(e), message_id=e.message_id) for i, e in enumerate(events)]
    errors = {Status.RETRY: AutoReconnect("primary stepped down"), Status.FAILED: ValueError("no fold")}
    items = [Item(body=d.body, event=e, status=s, error=errors.get(s)) for d, e, s in zip(batch, events, statuses,
                                                                                          strict=True)]
    return batch, BatchResult(items=items)


def test_settle_decides_a_copy_per_retry_and_failed_item_and_one_multiple_ack():
    shop = Shop()
    batch, result = outcomes(shop, Status.APPLIED, Status.RETRY, Status.DUPLICATE, Status.FAILED, Status.SKIPPED)
    plan = settle(TOPO, batch, result.items, ack_each=False)
    retry, failed = plan.copies
    assert retry.delivery is batch[1] and retry.copy.routing_key == TOPO.retry_queue(1) and not retry.copy.failed
    assert retry.copy.headers[H_RETRY_COUNT] == 1 and retry.record is None
    assert retry.message_id == batch[1].properties.message_id
    assert failed.copy.exchange == TOPO.failed_exchange and failed.copy.failed
    assert failed.record["failure_id"] == failed.copy.headers[H_FAILURE_ID]
    assert failed.record["error_class"] == "ValueError" and failed.record["user_id"] == "u3"
    assert plan.acks == [(5, True)]
    assert settle(TOPO, batch, result.items, ack_each=True).acks == [(t, False) for t in range(1, 6)]


def test_settle_out_of_retries_goes_to_failed_and_a_body_without_id_is_named_by_its_hash():
    shop = Shop()
    last = shop.delivery(7, b"{", headers={H_RETRY_COUNT: 2})  # max_retries=2: the last delay queue was used
    item = Item(body=b"{", status=Status.RETRY, error=AutoReconnect("down"))
    [out] = settle(TOPO, [last], [item], ack_each=False).copies
    assert out.copy.failed and out.copy.error_message.startswith("gave up after 2 retries: down")
    assert out.message_id.startswith("body-sha256:") and out.record["message_id"] == out.message_id


def test_the_worker_publishes_the_copies_records_the_failures_then_acks():
    shop = Shop()
    channel = shop.attach()
    batch, result = outcomes(shop, Status.APPLIED, Status.RETRY, Status.FAILED)
    shop.worker._settle(channel, batch, result)
    assert shop.broker.bodies(TOPO.retry_queue(1)) == [batch[1].body]
    assert shop.broker.bodies(TOPO.failed_queue) == [batch[2].body]
    assert [r["message_id"] for r in shop.store.records] == [batch[2].properties.message_id]
    assert channel.acks == [(3, True)]
    t = shop.worker.totals
    assert (t.applied, t.retried, t.failed, t.batches) == (1, 1, 1, 1)
    assert (shop.worker.limits.processed, shop.worker.limits.failed) == (3, 1)


def test_failed_records_that_cannot_be_written_do_not_hold_the_ack():
    shop = Shop()
    channel = shop.attach()
    shop.store.fail_records = AutoReconnect("down")
    batch, result = outcomes(shop, Status.FAILED)
    shop.worker._settle(channel, batch, result)
    assert shop.broker.bodies(TOPO.failed_queue) == [batch[0].body] and channel.acks == [(1, True)]


def test_a_crash_before_the_ack_leaves_the_batch_unacked_and_it_comes_back():
    shop = Shop()
    shop.send(*(serialise(event(f"u{i}")) for i in range(2)))
    channel = shop.attach()
    channel.basic_consume(TOPO.queue, lambda *a: None)
    channel.deliver()
    batch = [shop.delivery(tag, m.body) for tag, m in channel.unacked.items()]
    _, result = outcomes(shop, Status.RETRY, Status.APPLIED)
    shop.worker._connection.fail_publish = pika.exceptions.StreamLostError("connection reset")
    with pytest.raises(broker.CONNECTION_ERRORS):
        shop.worker._settle(channel, batch, result)
    assert channel.acks == [] and shop.worker.totals.batches == 0
    shop.worker._connection.close()  # what the loop does next: the broker redelivers the batch
    assert [m.redelivered for m in shop.broker.queues[TOPO.queue]] == [True, True]
    assert shop.broker.bodies(TOPO.queue) == [d.body for d in batch]


def test_a_transient_provider_error_becomes_a_retry_copy_and_the_batch_is_acked():
    shop = Shop(limits=Limits(messages=2))
    shop.provider.fail = EmbeddingError("429 rate limited", transient=True)
    shop.send(serialise(event("u1", "red shoes", kind="search")), serialise(event("u2")))
    assert shop.worker.run() == 0
    [copy] = shop.broker.queues[TOPO.retry_queue(1)]
    assert json.loads(copy.body)["search_phrase"] == "red shoes" and copy.properties.headers[H_RETRY_COUNT] == 1
    assert shop.worker.totals.retried == 1 and shop.worker.totals.applied == 1
    assert not shop.broker.queues[TOPO.queue] and not shop.broker.queues[TOPO.failed_queue]


# ---- the poison journal -------------------------------------------------------------------------------------------

def buffered(shop: Shop, *deliveries: Delivery) -> None:
    shop.worker._buffer[:] = deliveries


def test_fresh_deliveries_are_one_batch_and_leave_no_journal():
    shop = Shop()
    buffered(shop, *(shop.delivery(i, b"x", message_id=f"m{i}") for i in (1, 2, 3)))
    assert [d.tag for d in shop.worker._take_batch()] == [1, 2, 3] and shop.redis.journal == {}


def test_redelivered_messages_on_their_first_attempt_go_together_and_are_journalled():
    shop = Shop()
    buffered(shop, shop.delivery(1, b"a", message_id="m1", redelivered=True),
             shop.delivery(2, b"b", message_id="m2", redelivered=True), shop.delivery(3, b"c", message_id="m3"))
    batch = shop.worker._take_batch()
    assert [(d.tag, d.kind) for d in batch] == [(1, "first"), (2, "first")]
    assert shop.redis.journal == {"m1": 1, "m2": 1}
    assert [d.kind for d in shop.worker._take_batch()] == ["fresh"]  # a fresh run is a batch of its own


def test_a_suspect_goes_alone():
    shop = Shop()
    shop.redis.journal["m1"] = 1  # its batch died once already
    buffered(shop, shop.delivery(1, b"a", message_id="m1", redelivered=True),
             shop.delivery(2, b"b", message_id="m2", redelivered=True))
    assert [(d.tag, d.kind) for d in shop.worker._take_batch()] == [(1, "suspect")]
    assert [(d.tag, d.kind) for d in shop.worker._take_batch()] == [(2, "first")]
    assert shop.redis.journal == {"m1": 2, "m2": 1}


def test_with_redis_down_redelivered_messages_are_taken_one_by_one():
    shop = Shop()
    shop.redis.down = True
    buffered(shop, *(shop.delivery(i, b"x", message_id=f"m{i}", redelivered=True) for i in (1, 2)))
    assert [(d.tag, d.attempts) for d in shop.worker._take_batch()] == [(1, -1)]


def test_a_message_that_kills_every_worker_ends_in_failed_as_poison_without_running():
    shop = Shop()
    body = serialise(event("u1"))
    shop.send(body)
    # a worker takes it, then dies before the ack (kill -9, OOM): in its fresh batch, in the batch of first attempts
    # after it came back, then SOLO_ATTEMPTS times alone
    for _ in range(2 + SOLO_ATTEMPTS):
        channel = shop.attach()
        channel.basic_consume(TOPO.queue, shop.worker._on_message)
        shop.worker._connection.process_data_events()
        shop.worker._take_batch()
        shop.worker._connection.close()
    channel = shop.attach()
    channel.basic_consume(TOPO.queue, shop.worker._on_message)
    shop.worker._connection.process_data_events()
    shop.worker._run_batch(channel)
    [failed] = shop.broker.queues[TOPO.failed_queue]
    assert failed.body == body and failed.properties.headers[H_ERROR_CLASS] == "PoisonMessage"
    assert shop.store.writes == 0 and channel.acks == [(1, True)] and not shop.broker.queues[TOPO.queue]
    assert shop.redis.journal == {}  # settled: its journal entry is gone


def test_a_batch_the_broker_cuts_is_not_counted_as_a_death():
    shop = Shop()
    shop.send(serialise(event("u1")), redelivered=True)
    channel = shop.attach()
    channel.basic_consume(TOPO.queue, shop.worker._on_message)
    shop.worker._connection.process_data_events()
    shop.worker._connection.fail_ack = pika.exceptions.StreamLostError("node lost")
    with pytest.raises(broker.CONNECTION_ERRORS):
        shop.worker._run_batch(channel)
    assert shop.redis.journal == {}
