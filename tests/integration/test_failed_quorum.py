"""`failed show/retry/remove` on a quorum failed queue, as `setup-transports` declares it on a cluster (here on the
local node): a quorum queue gives released messages back in another order (past 32 of them) and counts each
release as a delivery, so the walk must tell messages apart by id, never by position."""

from __future__ import annotations

import hashlib
import json

import pika
import pytest

from myshop_ops.adapters import broker
from myshop_ops.tools.failed_queue import FailedBox

pytestmark = pytest.mark.integration

N = 60  # past the 32 a quorum queue returns in their order


def fid(key: str) -> str:
    return hashlib.md5(key.encode()).hexdigest()


def queue_ids(box: FailedBox) -> list[str]:
    """The message ids in the failed queue (one more walk)."""
    ids: list[str] = []
    box.walk(lambda msg: ids.append(msg.message_id) or False)
    return ids


def test_failed_tools_on_a_quorum_failed_queue(failed_box: FailedBox):
    conn, topo = failed_box.connection, failed_box.topo
    ch = conn.channel()
    ch.queue_delete(topo.failed_queue)
    ch.queue_declare(topo.failed_queue, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(topo.failed_queue, topo.failed_exchange, routing_key=topo.failed_queue)
    ch.confirm_delivery()
    keys = [f"k{i:02d}" for i in range(N)]
    for key in keys:
        ch.basic_publish(topo.failed_exchange, topo.failed_queue, json.dumps({"user_id": "u1", "n": key}).encode(),
                         pika.BasicProperties(message_id=f"m-{key}", headers={"x-failure-id": fid(key)},
                                              delivery_mode=2))
    ch.close()
    first = failed_box.check()  # recorded from the queue (no worker wrote records here)
    assert sorted(first.recorded_from_queue) == sorted(fid(k) for k in keys)
    for _ in range(5):  # walk after walk, as `failed show` then `failed retry` do
        again = failed_box.check()
        assert again.consistent and again.queue_count == again.record_count == N, again
    retried = failed_box.retry([fid(k) for k in keys[:5]] + ["m-" + keys[5]])
    removed = failed_box.remove([fid(k) for k in keys[10:15]])
    assert sorted(retried.done) == sorted(fid(k) for k in keys[:6]) and not retried.missing
    assert sorted(removed.done) == sorted(fid(k) for k in keys[10:15]) and not removed.missing
    left = set(keys[6:10] + keys[15:])
    assert sorted(queue_ids(failed_box)) == sorted(f"m-{k}" for k in left)
    assert broker.queue_depth(conn, topo.queue)[0] == 6  # the retried ones, in the main queue once each
    final = failed_box.check()
    assert final.consistent and final.queue_count == final.record_count == len(left)
