"""A delivery's properties and body against the real broker: a valid event with a message_id that is not UTF-8,
redelivered, crashes no worker and loses none of its user's events; a body over the contract's limit fails alone and
its failed copy and record hold a prefix and the size. Real RabbitMQ, Redis and the Mongo-wire server; in-process
workers, each run of which must end with exit code 0. The same over generated deliveries, on the stand-ins:
tests/unit/test_consume_boundary.py."""

from __future__ import annotations

import json

import pika
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import MAX_BODY_BYTES, make_event, serialise
from myshop_ops.core.retry_routing import H_ERROR_MESSAGE, H_ORIGINAL_SIZE
from myshop_ops.core.worker import BODY_PREFIX_BYTES
from tests.reliability.test_hostile import applied_users, failed_queue_list, run_workers_until
from tests.support.events import T0, seed_products
from tests.support.services import wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]


def publish_with(settings, topo, messages: list[tuple[bytes, pika.BasicProperties]]) -> None:
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    ch.confirm_delivery()
    for body, props in messages:
        ch.basic_publish(topo.exchange, topo.queue, body, props)
    conn.close()


def take_unacked_and_close(settings, queue: str, n: int) -> list[tuple[pika.spec.Basic.GetOk, object]]:
    """Get ``n`` messages without acking them, then close the channel: the broker redelivers them."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    got = []

    def take() -> bool:
        method, props, _ = ch.basic_get(queue, auto_ack=False)
        if method is not None:
            got.append((method, props))
        return len(got) == n

    wait_for(take, timeout=10, what=f"{n} messages in {queue}")
    conn.close()
    return got


def test_a_redelivered_event_with_a_non_utf8_message_id_crashes_no_worker(env, topology):
    """message_id=b'\\xff' (pika hands it over as bytes), redelivered: every worker used to exit 1 on it (TypeError
    in the Redis journal), and the delivery limit dead-lettered the user's whole batch."""
    s = env.settings()
    seed_products(s, ["p1"])
    tag = topology.queue.split(".")[0]
    user, neighbour = f"{tag}-victim", f"{tag}-neighbour"
    events = [make_event(user, "product_view", "p1", T0.replace(minute=i)) for i in range(5)]
    other = make_event(neighbour, "product_view", "p1", T0)
    props = [pika.BasicProperties(message_id=b"\xff", delivery_mode=2, content_type="application/json"),
             *(pika.BasicProperties(message_id=e.message_id, delivery_mode=2) for e in [*events[1:], other])]
    publish_with(s, topology, list(zip(map(serialise, [*events, other]), props, strict=True)))
    first = take_unacked_and_close(s, topology.queue, 6)
    assert first[0][1].message_id == b"\xff" and not first[0][0].redelivered
    again = take_unacked_and_close(s, topology.queue, 6)
    assert all(method.redelivered for method, _ in again)

    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        run_workers_until(s, lambda st: (st.get_profile_doc(user) or {}).get("event_count") == 5
                          and neighbour in applied_users(st))
        assert store.failed.count_documents({}) == 0 and failed_queue_list(s, topology) == []
        assert store.get_profile_doc(neighbour)["event_count"] == 1
    finally:
        store.close()


def test_a_body_over_the_limit_fails_alone_with_a_prefix_and_its_size(env, topology):
    s = env.settings()
    seed_products(s, ["p1"])
    tag = topology.queue.split(".")[0]
    big = json.dumps({"user_id": f"{tag}-big", "pad": "x" * 2_000_000}).encode()
    fine = make_event(f"{tag}-fine", "product_view", "p1", T0)
    publish_with(s, topology, [(big, pika.BasicProperties(message_id=f"{tag}-big", delivery_mode=2)),
                               (serialise(fine), pika.BasicProperties(message_id=fine.message_id, delivery_mode=2))])
    run_workers_until(s, lambda st: st.failed.count_documents({}) == 1 and f"{tag}-fine" in applied_users(st))
    [(headers, body)] = failed_queue_list(s, topology)
    assert body == big[:BODY_PREFIX_BYTES] and headers[H_ORIGINAL_SIZE] == len(big)
    assert f"body: larger than {MAX_BODY_BYTES} bytes (got {len(big)})" in headers[H_ERROR_MESSAGE]
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        record = store.failed.find_one({"message_id": f"{tag}-big"})
        assert record["original_size"] == len(big) and len(record["body"]) == BODY_PREFIX_BYTES
    finally:
        store.close()
