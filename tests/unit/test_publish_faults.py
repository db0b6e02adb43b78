"""Publishers under a cluster's faults, without a broker (issue 16): a nacked publish goes again on a fresh channel
(the RabbitMQ 3.10 stall after a leader election ends there), never dropped silently; a connection blocked by an
alarm is reported at once and given up after a bound with one line. The real thing: tests/cluster."""

from __future__ import annotations

import pika
import pika.exceptions as pex
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import NACK_PAUSES_S, BrokerError, PublishBlocked, Publisher


class FakeIOLoop:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, callback):
        self.timers.append((delay, callback))

    def run_timers(self):
        timers, self.timers = self.timers, []
        for _delay, callback in timers:
            callback()


class FakeImpl:
    def __init__(self):
        self.ioloop = FakeIOLoop()
        self.on_blocked, self.on_unblocked = [], []

    def add_on_connection_blocked_callback(self, cb):
        self.on_blocked.append(cb)

    def add_on_connection_unblocked_callback(self, cb):
        self.on_unblocked.append(cb)

    def block(self, reason="low on memory"):
        frame = type("F", (), {"method": pika.spec.Connection.Blocked(reason)})()
        for cb in self.on_blocked:
            cb(self, frame)

    def unblock(self):
        for cb in self.on_unblocked:
            cb(self, None)


class FakeChannel:
    def __init__(self, conn, number):
        self.conn, self.number, self.is_open, self.published = conn, number, True, []
        self.queue = []  # for basic_get
        self.acked = []

    def confirm_delivery(self):
        pass

    def basic_publish(self, exchange, key, body, props, mandatory=False):
        if self.conn.raise_on_publish is not None:
            raise self.conn.raise_on_publish
        if self.number <= self.conn.stalled_channels:
            raise pex.NackError([])
        self.published.append((exchange, key, body))
        self.conn.published.append((self.number, body))

    def basic_get(self, queue, auto_ack=False):
        if not self.conn.source:
            return None, None, None
        body = self.conn.source.pop(0)
        tag = len(self.acked) + 100
        return type("M", (), {"delivery_tag": tag})(), pika.BasicProperties(message_id="m"), body

    def basic_ack(self, tag):
        self.acked.append(tag)

    def close(self):
        self.is_open = False


class FakeConnection:
    """Channels 1..stalled_channels nack every publish (one channel is the consumer's side in `move`)."""

    def __init__(self, stalled_channels=0):
        self._impl = FakeImpl()
        self.stalled_channels = stalled_channels
        self.channels: list[FakeChannel] = []
        self.published = []
        self.slept = []
        self.raise_on_publish = None
        self.source = []

    def channel(self):
        ch = FakeChannel(self, len(self.channels) + 1)
        self.channels.append(ch)
        return ch

    def sleep(self, seconds):
        self.slept.append(seconds)


def test_a_nack_stall_ends_on_a_fresh_channel():
    conn = FakeConnection(stalled_channels=2)  # the first two channels were opened during the election
    nacks = []
    pub = Publisher(conn, on_nack=lambda: nacks.append(1))
    pub.publish("x", "k", b"body", message_id="m1")
    assert conn.published == [(3, b"body")]
    assert len(nacks) == 2 and pub.nacks == 2
    assert not conn.channels[0].is_open and not conn.channels[1].is_open and conn.channels[2].is_open
    assert pub.channel is conn.channels[2]
    assert conn.slept == list(NACK_PAUSES_S[:2])


def test_nacked_on_every_fresh_channel_raises_one_line_never_drops():
    conn = FakeConnection(stalled_channels=10_000)
    pub = Publisher(conn)
    with pytest.raises(BrokerError) as err:
        pub.publish("x", "k", b"body", message_id="m1")
    assert pub.nacks == len(NACK_PAUSES_S) + 1
    assert "refused message m1 8 times, each on a fresh channel" in str(err.value)
    assert "\n" not in str(err.value)
    assert sum(conn.slept) < 5  # bounded


def test_unroutable_is_not_retried():
    conn = FakeConnection()
    conn.raise_on_publish = pex.UnroutableError([])
    with pytest.raises(broker.Unroutable, match=r"unroutable .*is the node of that queue down"):
        Publisher(conn).publish("x", "k", b"body", message_id="m1")
    assert len(conn.channels) == 1


def test_a_blocked_connection_is_reported_ticks_and_is_given_up_after_the_bound():
    conn = FakeConnection()
    changes, ticks = [], []
    pub = Publisher(conn, on_blocked=lambda b, r: changes.append((b, r)), tick=lambda: ticks.append(1))
    conn._impl.block("low on memory")
    assert pub.watch.blocked and changes == [(True, "low on memory")]
    conn._impl.ioloop.run_timers()
    conn._impl.ioloop.run_timers()
    assert len(ticks) == 2  # fed every second while blocked
    conn.raise_on_publish = pex.ConnectionBlockedTimeout()  # pika closed it after blocked_connection_timeout
    with pytest.raises(PublishBlocked) as err:
        pub.publish("x", "k", b"body", message_id="m1")
    assert f"blocked publishing for {broker.BLOCKED_TIMEOUT_S}s" in str(err.value) and "\n" not in str(err.value)
    conn._impl.unblock()
    assert not pub.watch.blocked and changes[-1] == (False, "")
    conn._impl.ioloop.run_timers()
    assert len(ticks) == 2  # no more ticks once unblocked


def test_connection_parameters_bound_the_blocked_wait():
    params = broker.connection_parameters("amqp://guest:guest@127.0.0.1:5672/%2f", name="t")
    assert params.blocked_connection_timeout == broker.BLOCKED_TIMEOUT_S


def test_move_survives_a_nack_stall_and_acks_only_what_was_confirmed(monkeypatch):
    conn = FakeConnection(stalled_channels=0)
    conn.source = [b"a", b"b"]
    # channel 1 is move's consumer side, channel 2 its first publishing channel: make only that one stall
    original = FakeChannel.basic_publish

    def stalled(self, *args, **kwargs):
        if self.number == 2:
            raise pex.NackError([])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FakeChannel, "basic_publish", stalled)
    assert broker.move(conn, "src", "dst") == 2
    assert [b for _n, b in conn.published] == [b"a", b"b"]
    assert len(conn.channels[0].acked) == 2
