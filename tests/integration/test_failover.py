"""Every publisher of the project goes on on another node when its node dies mid-run.

The "node" is a relay in front of the real broker (tests/support/relay.py): RABBITMQ_DSN lists the relay first and
the broker itself second. The relay keeps the broker's replies back from the k-th publish on (the broker has the
message, the client has no confirm), the test waits until the broker holds it, then kills the relay as a node dies.
The publisher must go on through the second URL, publish again what it had not confirmed (same message id), lose
nothing, never ack a source message before its copy was confirmed, and say how many it published again. The same
on a real 3-node cluster with kill -9: tests/cluster/test_failover.py."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pika
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import BrokerError, Failover
from myshop_ops.adapters.publisher import LOST, OK, UNSENT, WindowedPublisher
from myshop_ops.tools import unrouted
from tests.support.relay import Relay
from tests.support.services import RABBIT, run_cli, wait_for
from tests.support.workers import one_line, queue_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def put(settings, exchange: str, routing_key: str, n: int) -> list[str]:
    """``n`` confirmed messages (body = message id); their ids."""
    ids = [f"m{i:04d}" for i in range(n)]
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    ch.confirm_delivery()
    for mid in ids:
        ch.basic_publish(exchange, routing_key, mid.encode(), pika.BasicProperties(message_id=mid, delivery_mode=2))
    conn.close()
    return ids


def ids_in(settings, queue: str) -> Counter:
    """The message ids of every message in ``queue`` (all left in it)."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    got = Counter()
    while (m := ch.basic_get(queue, auto_ack=False))[0] is not None:
        got[m[1].message_id] += 1
    conn.close()
    return got


def kill_once_held(relay: Relay, settings, queue: str, depth: int) -> None:
    """Once the relay holds the broker's replies and ``queue`` holds ``depth`` messages (the held publish is in
    the broker, unconfirmed), the node dies."""
    wait_for(relay.held.is_set, timeout=60, what="the relay holding the broker's replies")
    wait_for(lambda: queue_state(settings, queue)[0] >= depth, timeout=30, what=f"{depth} messages in {queue}")
    relay.kill()


def cli_in_thread(env, *args: str) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(run_cli(*args, env=env.subprocess_env(COLUMNS="200"))))
    t.start()
    return t, out


def test_generate_test_events_goes_on_on_the_next_node_and_republishes_what_was_unconfirmed(env, topology, tmp_path):
    s = env.settings()
    relay = Relay(5672, hold_after=150)
    env["RABBITMQ_DSN"] = f"{relay.url},{RABBIT}"
    record = tmp_path / "events.jsonl"
    t, out = cli_in_thread(env, "generate-test-events", "--users", "4", "--events-per-user", "100", "--event-type",
                           "search", "--delay-ms", "5", "--yes", "--json", "--record", str(record))
    kill_once_held(relay, s, topology.queue, 400)  # all 400 in the broker, none confirmed past the 150th publish
    t.join(90)
    done = out[0]
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    fo = data["failover"]
    assert data["published"] == 400 and data["failed"] == 0 and data["error"] is None, data
    assert fo["count"] == 1 and fo["brokers"] == [data["broker"], RABBIT.replace("guest:guest", "guest:***")], fo
    assert 250 <= fo["republished"] <= 400, fo  # at least every publish after the hold
    err = one_line(done.stderr)
    assert f"failover: connection to {data['broker']} lost" in err and f"{fo['republished']:,} unconfirmed" in err
    ids = [json.loads(line)["message_id"] for line in record.read_bytes().splitlines()]
    assert len(set(ids)) == 400  # every event recorded once, in publish order
    got = ids_in(s, topology.queue)
    assert set(got) == set(ids) and sum(got.values()) == 400 + fo["republished"]  # each resent one: a duplicate


def test_unrouted_republish_fails_over_and_moves_every_message_once_confirmed(env, topology):
    s = env.settings()
    ids = put(s, topology.exchange, "no.binding.matches", 50)
    wait_for(lambda: queue_state(s, topology.unrouted)[0] == 50, timeout=10)
    relay = Relay(5672, hold_after=20)
    env["RABBITMQ_DSN"] = f"{relay.url},{RABBIT}"
    t, out = cli_in_thread(env, "unrouted", "republish")
    kill_once_held(relay, s, topology.queue, 20)  # the 20th copy is in the main queue, its original not acked
    t.join(60)
    done = out[0]
    assert done.returncode == 0, done.stdout + done.stderr
    text = one_line(done.stdout)
    assert f"moved 50 message(s) from {topology.unrouted}" in text
    assert "RabbitMQ connection lost 1 time(s), went on on another node: 1 republished after failover" in text
    assert queue_state(s, topology.unrouted)[0] == 0
    got = ids_in(s, topology.queue)
    assert set(got) == set(ids) and sum(got.values()) == 51 and got[ids[19]] == 2  # the one in hand: moved again


def test_failed_retry_fails_over_and_retries_every_message_once_confirmed(env, topology):
    s = env.settings()
    ids = put(s, "", topology.failed_queue, 30)
    relay = Relay(5672, hold_after=10)
    env["RABBITMQ_DSN"] = f"{relay.url},{RABBIT}"
    t, out = cli_in_thread(env, "failed", "retry", "--all", "--force")
    kill_once_held(relay, s, topology.queue, 10)
    t.join(60)
    done = out[0]
    assert done.returncode == 0, done.stdout + done.stderr
    text = one_line(done.stdout)
    assert "retried 30 message(s)" in text and "1 republished after failover" in text, text
    assert queue_state(s, topology.failed_queue)[0] == 0
    got = ids_in(s, topology.queue)
    assert set(got) == set(ids) and sum(got.values()) == 31 and got[ids[9]] == 2


def test_failover_is_bounded_and_names_the_nodes_tried(env, topology):
    """The only node dies and stays dead: each publisher gives up after its bound, with one line naming the URL
    tried and what to do; the move leaves every message not confirmed elsewhere in its source."""
    s = env.settings()
    relay = Relay(5672, hold_after=30)
    messages = [(b"{}", f"{i:064x}") for i in range(100)]
    pub = WindowedPublisher(relay.url, topology.exchange, topology.queue, window=10, delay_s=0.002, failover_s=1)
    killer = threading.Thread(target=kill_once_held, args=(relay, s, topology.queue, 30))
    killer.start()
    result = pub.run(messages)
    killer.join()
    masked = relay.url.replace("guest:guest", "guest:***")
    assert result.error is not None and "no node of RABBITMQ_DSN took over within 1s" in result.error, result.error
    assert f"tried {masked}: ConnectionRefusedError" in result.error and "start a node" in result.error
    assert result.published + result.lost + result.unsent == 100 and result.lost >= 1 and result.unsent >= 1
    assert set(result.status) <= {OK, LOST, UNSENT}

    conn = broker.connect(RABBIT)
    broker.purge(conn, topology.queue)
    conn.close()
    ids = put(s, topology.exchange, "no.binding.matches", 10)
    wait_for(lambda: queue_state(s, topology.unrouted)[0] == 10, timeout=10)
    relay = Relay(5672, hold_after=3)
    failover = Failover(relay.url, name="test-move", budget_s=1)
    killer = threading.Thread(target=kill_once_held, args=(relay, s, topology.queue, 3))
    killer.start()
    with pytest.raises(BrokerError) as exc:
        unrouted.republish(failover.connect(), topology, failover)
    killer.join()
    assert f"RabbitMQ connection to {relay.url.replace('guest:guest', 'guest:***')} lost" in str(exc.value)
    assert "took over within 1s" in str(exc.value) and "\n" not in str(exc.value)
    left = ids_in(s, topology.unrouted)
    assert set(left) == set(ids[2:]) and sum(left.values()) == 8  # the third: copied, its original not acked


def test_a_refusal_is_not_taken_for_a_lost_node():
    """A connection the broker closed on an error (540 NOT_IMPLEMENTED, as RabbitMQ 3.10 answers an if-unused delete
    of a quorum queue) would be refused again on any node: recover() raises it instead of reconnecting, so no mover
    loops on it; a node's shutdown close (320 CONNECTION_FORCED) and a dropped stream are lost nodes, replaced."""
    import pika.exceptions as pex

    failover = Failover(RABBIT, name="test-refusal", budget_s=1)
    first = failover.connect()
    refusal = pex.ConnectionClosedByBroker(540, "NOT_IMPLEMENTED - queue.delete with if-unused")
    with pytest.raises(pex.ConnectionClosedByBroker) as exc:
        failover.recover(refusal)
    assert exc.value is refusal and failover.failovers == 0 and failover.connection is first
    for lost in (pex.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown"), pex.StreamLostError("EOF")):
        assert failover.recover(lost).is_open
    assert failover.failovers == 2
    failover.connection.close()
